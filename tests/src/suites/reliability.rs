//! reliability: the mesh keeps talking through faults, restarts, paused
//! processes, a bad token and load (issue 14). Each case drives the real
//! components through the [`Topology`] only: the CA stopped or frozen
//! (SIGSTOP: connections hang instead of being refused) for longer than a
//! rotation window under continuous sidecar and ambient traffic; CA, agent,
//! proxy and ztunnel restarts; an agent and a ztunnel frozen past their
//! rotation point; a token replaced by an expired one; the CA's NotBefore
//! backdating seen by a peer whose clock is two minutes behind; and many
//! in-process identity workers (the agent's and ztunnel's own engine)
//! renewing short-lived certificates against the real CA, steadily and in a
//! burst. Every case adds its figures to a table printed after the suite
//! (failed requests, renewal time after the fault, CA requests per
//! workload, storm completion, CA p99).
//!
//! Load sizes: `MESHID_RELIABILITY_WORKLOADS` (default 20),
//! `MESHID_RELIABILITY_SECONDS` (default 20), `MESHID_RELIABILITY_BURST`
//! (default 100); the full size is 200 / 120 / 1000.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use meshid_common::ca_client::{CaClient, CaClientConfig, CallOptions};
use meshid_common::identity::{
    CaClientArgs, CaSource, CertificateSource, Clock, DEFAULT_CA_TIMEOUT, DEFAULT_MAX_BACKOFF,
    FirstFetch, RenewalEvents, SignRequest, TokenFile, Worker, WorkerConfig, WorkerParts,
};
use meshid_common::tls::{self, ClientAuth, PeerMatcher};
use meshid_common::{KeyType, SpiffeId, TrustBundle, Usage};
use tokio_util::sync::CancellationToken;

use super::ensure;
use super::rotation::agent_cert;
use crate::case;
use crate::client::{Tester, eventually, mtls_echo, plain_echo};
use crate::report::Report;
use crate::topology::{Mode, Proxy, Topology};

const SUITE: &str = "reliability";

/// One line of the figures table.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub scenario: String,
    pub failed_requests: String,
    pub renewal_after: String,
    pub ca_requests_per_workload: String,
    pub storm_completion: String,
    pub ca_p99: String,
}

/// The figures of one run of the suite.
#[derive(Debug, Default)]
pub struct Figures {
    pub rows: Vec<Row>,
}

impl Figures {
    fn add(&mut self, scenario: &str, f: impl FnOnce(&mut Row)) {
        let mut row = Row {
            scenario: scenario.into(),
            ..Row::default()
        };
        f(&mut row);
        self.rows.push(row);
    }

    /// The table as Markdown.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| scenario | failed requests | renewal after fault | CA requests per workload | storm completion | CA p99 |\n|---|---|---|---|---|---|\n",
        );
        let dash = |s: &str| {
            if s.is_empty() {
                "–".to_owned()
            } else {
                s.to_owned()
            }
        };
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.scenario,
                dash(&r.failed_requests),
                dash(&r.renewal_after),
                dash(&r.ca_requests_per_workload),
                dash(&r.storm_completion),
                dash(&r.ca_p99)
            );
        }
        out
    }
}

pub async fn run(mesh: &mut impl Topology, report: &mut Report) {
    let mut fig = Figures::default();
    case!(
        report,
        SUITE,
        "ca_outage_longer_than_a_rotation_window",
        ca_fault(mesh, &mut fig, Fault::Stop)
    );
    case!(
        report,
        SUITE,
        "ca_frozen_no_request_hangs_past_its_deadline",
        ca_fault(mesh, &mut fig, Fault::Freeze)
    );
    case!(
        report,
        SUITE,
        "ca_restart_keeps_the_root",
        ca_restart(mesh, &mut fig)
    );
    case!(
        report,
        SUITE,
        "agent_restart_mid_traffic_without_failed_requests",
        agent_restart(mesh, &mut fig)
    );
    case!(
        report,
        SUITE,
        "proxies_and_ztunnel_get_their_secrets_back_after_restart",
        proxy_restarts(mesh, &mut fig)
    );
    case!(
        report,
        SUITE,
        "frozen_agent_and_ztunnel_renew_at_once_on_resume",
        frozen_past_rotation(mesh, &mut fig)
    );
    case!(
        report,
        SUITE,
        "expired_token_is_a_clear_error_and_the_cert_is_kept",
        expired_token(mesh, &mut fig)
    );
    case!(
        report,
        SUITE,
        "a_peer_2_min_behind_accepts_a_fresh_cert",
        backdated_not_before(mesh, &mut fig)
    );
    let size = LoadSize::from_env();
    case!(
        report,
        SUITE,
        "load_steady_renewals_with_short_ttl",
        load_steady(mesh, &mut fig, &size)
    );
    case!(
        report,
        SUITE,
        "load_burst_every_workload_gets_a_cert",
        load_burst(mesh, &mut fig, &size)
    );
    case!(
        report,
        SUITE,
        "ca_restart_with_renewals_in_flight",
        ca_restart_under_load(mesh, &mut fig, &size)
    );
    println!("\nreliability figures:\n{}", fig.table());
}

// ---------------------------------------------------------------------------
// Identities, their state and traffic over them

/// Who holds an identity's certificate.
#[derive(Clone, Debug)]
enum Holder {
    /// A sidecar pod's agent (component name).
    Agent(String),
    /// A ztunnel (component name) holding a workload's certificate.
    Ztunnel(String),
}

#[derive(Clone, Debug)]
struct Ident {
    /// Pod or workload name.
    name: String,
    id: SpiffeId,
    holder: Holder,
}

impl Ident {
    fn component(&self) -> &str {
        match &self.holder {
            Holder::Agent(c) | Holder::Ztunnel(c) => c,
        }
    }
}

/// Where one identity stands, as its holder reports it.
#[derive(Clone, Debug, Default)]
struct IdState {
    serial: Option<String>,
    /// Unix seconds.
    not_after: Option<i64>,
    /// The next renewal or retry, unix seconds.
    next_refresh: Option<i64>,
    /// CSRs sent so far (agent: its `/metrics` counter; ztunnel: answers
    /// and failures of this identity from `/debug/certs`).
    requests: u64,
    last_error: Option<String>,
}

fn identities(mesh: &impl Topology) -> Vec<Ident> {
    let mut out: Vec<Ident> = mesh
        .pods()
        .iter()
        .map(|p| Ident {
            name: p.name.clone(),
            id: p.id.clone(),
            holder: Holder::Agent(p.agent.clone()),
        })
        .collect();
    out.extend(mesh.ambient().iter().map(|a| Ident {
        name: a.name.clone(),
        id: a.id.clone(),
        holder: Holder::Ztunnel(a.ztunnel.clone()),
    }));
    out
}

/// The sum of every sample of metric `name` whose labels contain `label`.
fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let bare = series.split('{').next().unwrap_or_default();
        if bare == name && series.contains(label) {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

async fn id_state(mesh: &impl Topology, ident: &Ident) -> Result<IdState, String> {
    let get = |path: &'static str| async move {
        let r = mesh
            .admin_get(ident.component(), path)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(r.body)
    };
    match &ident.holder {
        Holder::Agent(agent) => {
            let v: serde_json::Value = serde_json::from_str(&get("/debug/certs").await?)
                .map_err(|e| format!("{agent} /debug/certs: {e}"))?;
            let requests = metric(
                &get("/metrics").await?,
                "istio_agent_num_outgoing_requests",
                "csr",
            )
            .ok_or_else(|| format!("{agent} /metrics has no istio_agent_num_outgoing_requests"))?;
            // From the same answer: a second read could find the
            // certificate expired in between (a long CA outage).
            let not_after = match v["serial"].as_str() {
                Some(_) => {
                    let text = v["not_after"].as_str().unwrap_or_default();
                    let t = time::OffsetDateTime::parse(
                        text,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .map_err(|e| format!("{agent} /debug/certs not_after {text:?}: {e}"))?;
                    Some(t.unix_timestamp())
                }
                None => None,
            };
            Ok(IdState {
                serial: v["serial"].as_str().map(str::to_owned),
                not_after,
                next_refresh: v["next_rotation_unix"].as_i64(),
                requests: requests as u64,
                last_error: v["last_error"].as_str().map(str::to_owned),
            })
        }
        Holder::Ztunnel(z) => {
            let v: serde_json::Value = serde_json::from_str(&get("/debug/certs").await?)
                .map_err(|e| format!("{z} /debug/certs: {e}"))?;
            let c = v["certificates"]
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|c| c["identity"].as_str() == Some(ident.id.as_str()))
                })
                .cloned()
                .ok_or_else(|| format!("{z} has no certificate entry for {}", ident.id))?;
            Ok(IdState {
                serial: c["serial"].as_str().map(str::to_owned),
                not_after: c["not_after"].as_i64(),
                next_refresh: c["next_refresh"].as_i64(),
                requests: c["fetches"].as_u64().unwrap_or(0) + c["failures"].as_u64().unwrap_or(0),
                last_error: c["last_error"].as_str().map(str::to_owned),
            })
        }
    }
}

async fn all_states(mesh: &impl Topology, ids: &[Ident]) -> Result<Vec<IdState>, String> {
    let mut out = Vec::with_capacity(ids.len());
    for i in ids {
        out.push(id_state(mesh, i).await?);
    }
    Ok(out)
}

/// A plaintext route into the mesh (a sidecar's or a ztunnel's outbound
/// listener) and the two identities whose certificates carry it.
#[derive(Clone, Debug)]
struct Route {
    listen: SocketAddr,
    label: String,
    /// Indexes into the identities: source and destination.
    ids: [usize; 2],
}

fn routes(mesh: &impl Topology, ids: &[Ident]) -> Vec<Route> {
    let idx = |name: &str| ids.iter().position(|i| i.name == name);
    let mut out = Vec::new();
    let from_pods = mesh
        .pods()
        .iter()
        .filter_map(|p| p.outbound.clone().map(|o| (p.name.clone(), o)));
    let from_ambient = mesh
        .ambient()
        .iter()
        .filter_map(|a| a.outbound.clone().map(|o| (a.name.clone(), o)));
    for (src, (listen, dst)) in from_pods.chain(from_ambient) {
        if let (Some(s), Some(d)) = (idx(&src), idx(&dst)) {
            out.push(Route {
                listen,
                label: format!("{src} -> {dst}"),
                ids: [s, d],
            });
        }
    }
    out
}

/// One request of the traffic generator.
#[derive(Clone, Debug)]
struct Sample {
    at: SystemTime,
    route: usize,
    error: Option<String>,
}

/// New connections over every route, one round every `every`, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Traffic {
    fn start(routes: Vec<Route>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let round = routes.iter().enumerate().map(|(n, r)| async move {
                    let at = SystemTime::now();
                    let error = plain_echo(r.listen, b"reliability\n").await.err();
                    Sample {
                        at,
                        route: n,
                        error,
                    }
                });
                out.extend(futures::future::join_all(round).await);
                tokio::time::sleep(every).await;
            }
            out
        });
        Traffic { stop, task }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// Failed samples, except those that met an identity whose certificate had
/// expired (`expiry[i]`, unix seconds, `None`: never expired in the window).
fn unexcused<'a>(
    samples: &'a [Sample],
    routes: &[Route],
    expiry: &[Option<i64>],
) -> (Vec<&'a Sample>, usize) {
    let mut excused = 0;
    let mut bad = Vec::new();
    for s in samples.iter().filter(|s| s.error.is_some()) {
        let t = meshid_common::cert::unix_secs(s.at);
        let expired = routes[s.route]
            .ids
            .iter()
            .any(|i| expiry[*i].is_some_and(|na| t + 1 >= na));
        if expired {
            excused += 1;
        } else {
            bad.push(s);
        }
    }
    (bad, excused)
}

fn now_unix() -> i64 {
    meshid_common::cert::unix_secs(SystemTime::now())
}

fn unix_f64(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// When an identity's CSRs failed during an outage, in unix seconds: from
/// its first failed CSR to the snapshot of its counters, each end as an
/// earliest and a latest possible instant.
#[derive(Clone, Copy, Debug, PartialEq)]
struct FailWindow {
    first_early: f64,
    first_late: f64,
    end_early: f64,
    end_late: f64,
}

/// When an identity's first CSR after `down` is due: its rotation point
/// (whole seconds, truncated, as the holders report it; the worker may wake
/// a little after it: `late` adds that) or `down` if later.
fn rotation_start(down: f64, next_refresh: Option<i64>, late: bool) -> f64 {
    let t = next_refresh.map_or(down, |t| t as f64 + if late { 1.3 } else { 0.0 });
    t.max(down)
}

impl FailWindow {
    /// The fewest and the most CSRs a capped exponential backoff (first
    /// delay `initial`, doubling up to `cap`, each delay cut by up to 25 %
    /// of jitter, as `backoff_delay`) sends in this window, counting the
    /// first one at the rotation point.
    fn attempts(&self, initial: Duration, cap: Duration) -> (u64, u64) {
        // Each failed attempt takes a little time of its own (refused
        // connect, logging): the fewest allow 150 ms per attempt.
        let shortest = (self.end_early - self.first_late).max(0.0);
        let longest = (self.end_late - self.first_early).max(0.0);
        (
            attempts_within(shortest, initial, cap, 1.0, 0.15),
            attempts_within(longest, initial, cap, 0.75, 0.0),
        )
    }
}

/// CSRs sent in `window` seconds by a backoff whose delays are `scale` x
/// `min(initial x 2^k, cap)`, each attempt taking `cost` seconds; the first
/// at 0 (none if the window is empty).
fn attempts_within(window: f64, initial: Duration, cap: Duration, scale: f64, cost: f64) -> u64 {
    if window <= 0.0 {
        return 0;
    }
    let (mut n, mut t, mut k) = (1u64, 0.0f64, 0u32);
    loop {
        let exp = initial.saturating_mul(1u32.checked_shl(k.min(31)).unwrap_or(u32::MAX));
        t += exp.min(cap).as_secs_f64() * scale + cost;
        if t > window {
            return n;
        }
        n += 1;
        k += 1;
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------
// 1. CA outage and a frozen CA

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The CA process is stopped: connections are refused.
    Stop,
    /// The CA process is frozen (SIGSTOP): connections hang.
    Freeze,
}

/// The CA is away for longer than a rotation window plus four retry caps
/// (half the TTL, plus two seconds, plus 4 x the agents' and ztunnels'
/// `--max-backoff`) while new connections cross every sidecar and ambient
/// route every 200 ms. No request may fail unless one of its certificates
/// had expired; each identity tries the CA on a capped exponential
/// schedule from its rotation point: never more often (no tight loop) and,
/// for a stopped CA, never less often (the cap holds) than that schedule
/// allows; after the CA returns, each renews by its next scheduled retry,
/// within one cap period.
async fn ca_fault(mesh: &mut impl Topology, fig: &mut Figures, fault: Fault) -> Result<(), String> {
    let ids = identities(mesh);
    let routes = routes(mesh, &ids);
    ensure(!routes.is_empty(), || "no routes to carry traffic".into())?;
    let (initial, cap) = mesh.ca_client_backoff();
    let outage = mesh.ttl() / 2 + Duration::from_secs(2) + (cap * 4).min(mesh.ttl());
    let before = all_states(mesh, &ids).await?;
    let traffic = Traffic::start(routes.clone(), Duration::from_millis(200));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The counts start here: each identity's first CSR of the outage is
    // due at its rotation point.
    let at_stop = all_states(mesh, &ids).await?;
    let down_at = Instant::now();
    let down_unix = unix_f64(SystemTime::now());
    // A stop can take a while (docker stop: the CA drains its open
    // connections first, and may still answer on them): the lower bound
    // counts from a second snapshot, taken once the stop returned.
    let mut gone = (at_stop.clone(), down_unix);
    let probe = match fault {
        Fault::Stop => {
            mesh.stop("ca").await.map_err(|e| e.to_string())?;
            let states = all_states(mesh, &ids).await?;
            gone = (states, unix_f64(SystemTime::now()));
            None
        }
        Fault::Freeze => {
            mesh.pause("ca").await.map_err(|e| e.to_string())?;
            // A fresh client with a 2 s deadline must give up within it.
            let root = mesh.ca_root_pem().map_err(|e| e.to_string())?;
            let mut cfg = CaClientConfig::new(mesh.ca_address(), root);
            cfg.call_timeout = Duration::from_secs(2);
            cfg.connect_timeout = Duration::from_secs(2);
            Some(tokio::spawn(async move {
                let started = Instant::now();
                let client = CaClient::new(cfg).map_err(|e| e.to_string())?;
                let key = meshid_common::PrivateKey::generate(KeyType::EcdsaP256)
                    .map_err(|e| e.to_string())?;
                let id = SpiffeId::for_service_account("cluster.local", "e2e", "probe")
                    .map_err(|e| e.to_string())?;
                let r = client
                    .sign(key, &id, Duration::from_secs(60), CallOptions::default())
                    .await;
                Ok::<_, String>((started.elapsed(), r.err().map(|e| e.to_string())))
            }))
        }
    };
    tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
    // What each identity did while the CA was away.
    let snap_from = unix_f64(SystemTime::now());
    let during = all_states(mesh, &ids).await?;
    let snap_to = unix_f64(SystemTime::now());
    match fault {
        Fault::Stop => mesh.start("ca").await.map_err(|e| e.to_string())?,
        Fault::Freeze => mesh.resume("ca").await.map_err(|e| e.to_string())?,
    }
    let up_at = Instant::now();
    let up_unix = now_unix();
    let away = up_at - down_at;
    let at_return = all_states(mesh, &ids).await?;

    // Each identity renews by its scheduled retry (plus polling slack).
    let slack = Duration::from_secs(2);
    let limit = cap + DEFAULT_CA_TIMEOUT + slack;
    let mut renewed: Vec<Option<Duration>> = vec![None; ids.len()];
    while renewed.iter().any(Option::is_none) && up_at.elapsed() < limit {
        for (n, i) in ids.iter().enumerate() {
            if renewed[n].is_none() {
                let s = id_state(mesh, i).await?;
                if s.serial.is_some() && s.serial != before[n].serial {
                    renewed[n] = Some(up_at.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = traffic.finish().await;
    let probe = match probe {
        Some(p) => Some(p.await.map_err(|e| e.to_string())??),
        None => None,
    };

    // Requests: none failed while its certificates were valid.
    let expiry: Vec<Option<i64>> = before.iter().map(|s| s.not_after).collect();
    let (bad, excused) = unexcused(&samples, &routes, &expiry);
    // CA requests per identity while the CA was away, and what the capped
    // schedule allows from its rotation point to the snapshot.
    let sent: Vec<u64> = during
        .iter()
        .zip(&at_stop)
        .map(|(d, b)| d.requests.saturating_sub(b.requests))
        .collect();
    let sent_since_gone: Vec<u64> = during
        .iter()
        .zip(&gone.0)
        .map(|(d, b)| d.requests.saturating_sub(b.requests))
        .collect();
    let allowed: Vec<(u64, u64)> = at_stop
        .iter()
        .zip(&gone.0)
        .map(|(first, after)| {
            FailWindow {
                first_early: rotation_start(down_unix, first.next_refresh, false),
                first_late: rotation_start(gone.1, after.next_refresh, true),
                end_early: snap_from,
                end_late: snap_to,
            }
            .attempts(initial, cap)
        })
        .collect();
    let slowest = renewed.iter().flatten().max().copied().unwrap_or_default();
    let name = match fault {
        Fault::Stop => format!("CA stopped {} (TTL {})", secs(away), secs(mesh.ttl())),
        Fault::Freeze => format!("CA frozen (SIGSTOP) {}", secs(away)),
    };
    fig.add(&name, |r| {
        r.failed_requests = format!(
            "{} of {} ({excused} to an expired cert)",
            bad.len(),
            samples.len()
        );
        r.renewal_after = format!("≤ {}", secs(slowest));
        r.ca_requests_per_workload = format!(
            "{} (capped schedule from each rotation point allows {}; cap {})",
            sent.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            allowed
                .iter()
                .map(|(lo, hi)| format!("{}–{hi}", if fault == Fault::Stop { *lo } else { 0 }))
                .collect::<Vec<_>>()
                .join(", "),
            secs(cap)
        );
    });

    ensure(bad.is_empty(), || {
        format!(
            "{} of {} requests failed while their certificates were valid; first: {} at {}: {}",
            bad.len(),
            samples.len(),
            routes[bad[0].route].label,
            meshid_common::cert::unix_secs(bad[0].at),
            bad[0].error.as_deref().unwrap_or_default()
        )
    })?;
    for (n, i) in ids.iter().enumerate() {
        let (fewest, most) = allowed[n];
        ensure(sent[n] <= most, || {
            format!(
                "{} ({}) sent {} CSRs during a {} outage: more than the {most} a backoff from {} capped at {} allows (tight loop)",
                i.name,
                i.component(),
                sent[n],
                secs(away),
                secs(initial),
                secs(cap)
            )
        })?;
        // A stopped CA refuses at once, so every retry is on schedule; a
        // frozen one holds each call up to its deadline.
        if fault == Fault::Stop {
            ensure(sent_since_gone[n] >= fewest, || {
                format!(
                    "{} ({}) sent {} CSRs after the CA was gone, in a {} outage: fewer than the {fewest} a backoff capped at {} sends (is the cap applied?)",
                    i.name,
                    i.component(),
                    sent_since_gone[n],
                    secs(away),
                    secs(cap)
                )
            })?;
        }
        // Agents count a CSR when it leaves, so a hung one counts too:
        // every agent met its rotation point during the outage.
        if matches!(i.holder, Holder::Agent(_)) {
            ensure(sent[n] >= 1, || {
                format!(
                    "{} sent no CSR during a {} outage, longer than its rotation window",
                    i.name,
                    secs(away)
                )
            })?;
        }
        let took = renewed[n].ok_or_else(|| {
            format!(
                "{} ({}) did not renew within {} after the CA returned; last error {:?}",
                i.name,
                i.component(),
                secs(limit),
                at_return[n].last_error
            )
        })?;
        // Its scheduled retry when the CA returned (a frozen CA answers a
        // hung request as soon as it thaws: due at once).
        let due = at_return[n]
            .next_refresh
            .map(|t| Duration::from_secs(t.saturating_sub(up_unix).max(0) as u64))
            .unwrap_or_default();
        ensure(took <= due + slack, || {
            format!(
                "{} renewed {} after the CA returned, later than its scheduled retry ({} after)",
                i.name,
                secs(took),
                secs(due)
            )
        })?;
        ensure(took <= cap + slack, || {
            format!(
                "{} renewed {} after the CA returned: more than one retry cap ({}) later",
                i.name,
                secs(took),
                secs(cap)
            )
        })?;
    }
    if let Some((elapsed, error)) = probe {
        ensure(error.is_some(), || {
            "a CSR to the frozen CA succeeded".into()
        })?;
        ensure(elapsed <= Duration::from_secs(4), || {
            format!(
                "a CA call with a 2 s deadline hung {} on the frozen CA",
                secs(elapsed)
            )
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Restarts

/// The CA restarts with the same root: a certificate issued before still
/// verifies against the bundle it publishes after, one issued after verifies
/// against the bundle from before, and a pod accepts the old one.
async fn ca_restart(mesh: &mut impl Topology, fig: &mut Figures) -> Result<(), String> {
    let pod = mesh
        .pods()
        .iter()
        .find(|p| p.mode == Mode::Strict)
        .cloned()
        .ok_or("no STRICT pod")?;
    let root_before = mesh.ca_root_pem().map_err(|e| e.to_string())?;
    let old = Tester::from_ca(
        mesh,
        "tester",
        "tester-reliability",
        Duration::from_secs(600),
    )
    .await?;
    let started = Instant::now();
    mesh.restart("ca").await.map_err(|e| e.to_string())?;
    let took = started.elapsed();
    let root_after = mesh.ca_root_pem().map_err(|e| e.to_string())?;
    let new = Tester::from_ca(
        mesh,
        "tester",
        "tester-reliability",
        Duration::from_secs(600),
    )
    .await?;
    fig.add("CA restart", |r| {
        r.failed_requests = "0 (old and new certs verify)".into();
        r.renewal_after = format!("CA ready in {}", secs(took));
    });
    let before = TrustBundle::from_pem(&root_before).map_err(|e| e.to_string())?;
    let after = TrustBundle::from_pem(&root_after).map_err(|e| e.to_string())?;
    ensure(before == after, || {
        "the CA publishes a different root bundle after its restart".into()
    })?;
    let now = SystemTime::now();
    after
        .verify(old.creds.svid.chain(), Usage::ClientAuth, now)
        .map_err(|e| {
            format!("a certificate issued before the CA restart no longer verifies: {e}")
        })?;
    before
        .verify(new.creds.svid.chain(), Usage::ClientAuth, now)
        .map_err(|e| {
            format!("a certificate issued after the CA restart does not chain to the old root: {e}")
        })?;
    mtls_echo(pod.inbound, &old, &pod.id, b"old cert after CA restart\n")
        .await
        .map_err(|e| {
            format!(
                "{} refused a certificate issued before the CA restart: {e}",
                pod.name
            )
        })?;
    mtls_echo(pod.inbound, &new, &pod.id, b"new cert after CA restart\n")
        .await
        .map(drop)
}

/// A shim pod's agent restarts while traffic flows to and from the pod: its
/// proxy keeps serving the certificate it holds, re-subscribes by itself,
/// and takes the new agent's certificate; no request fails.
async fn agent_restart(mesh: &mut impl Topology, fig: &mut Figures) -> Result<(), String> {
    let pod = mesh
        .pods()
        .iter()
        .find(|p| p.proxy == Proxy::Shim && p.mode == Mode::Strict)
        .cloned()
        .ok_or("no STRICT shim pod")?;
    let ids = identities(mesh);
    let routes: Vec<Route> = routes(mesh, &ids)
        .into_iter()
        .filter(|r| r.label.contains(&pod.name))
        .collect();
    let tester = Tester::from_ca(
        mesh,
        "tester",
        "tester-reliability",
        Duration::from_secs(600),
    )
    .await?;
    let traffic = Traffic::start(routes.clone(), Duration::from_millis(100));
    // mTLS straight to the pod's inbound too.
    let stop = Arc::new(AtomicBool::new(false));
    let direct = {
        let (stop, tester, pod) = (stop.clone(), tester.clone(), pod.clone());
        tokio::spawn(async move {
            let mut out: Vec<Result<String, String>> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                out.push(
                    mtls_echo(pod.inbound, &tester, &pod.id, b"agent restart\n")
                        .await
                        .map(|ex| ex.server_leaf.serial),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let restarted = mesh.restart(&pod.agent).await;
    let serial = match &restarted {
        Ok(()) => Some(agent_cert(mesh, &pod.agent).await?.0),
        Err(_) => None,
    };
    // The proxy presents the new agent's certificate.
    let taken = match &serial {
        Some(serial) => {
            eventually(
                Duration::from_secs(10),
                "the proxy takes the restarted agent's certificate",
                || async {
                    let ex = mtls_echo(pod.inbound, &tester, &pod.id, b"after restart\n").await?;
                    if &ex.server_leaf.serial == serial {
                        Ok(started.elapsed())
                    } else {
                        Err(format!("still {}", ex.server_leaf.serial))
                    }
                },
            )
            .await
        }
        None => Err("the agent did not restart".into()),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = traffic.finish().await;
    let direct = direct.await.map_err(|e| e.to_string())?;
    let failed: Vec<String> = samples
        .iter()
        .filter_map(|s| {
            s.error
                .clone()
                .map(|e| format!("{}: {e}", routes[s.route].label))
        })
        .chain(direct.iter().filter_map(|r| r.clone().err()))
        .collect();
    let total = samples.len() + direct.len();
    fig.add("agent restart mid-traffic", |r| {
        r.failed_requests = format!("{} of {total}", failed.len());
        r.renewal_after = taken
            .as_ref()
            .map(|d| format!("proxy on the new cert {} after the restart began", secs(*d)))
            .unwrap_or_default();
    });
    restarted.map_err(|e| e.to_string())?;
    taken?;
    ensure(failed.is_empty(), || {
        format!(
            "{} of {total} requests failed across the agent restart; first: {}",
            failed.len(),
            failed[0]
        )
    })
}

/// A restarted shim, Envoy and ztunnel each get their secrets back from
/// the agent or the CA and carry traffic again with a current certificate.
async fn proxy_restarts(mesh: &mut impl Topology, fig: &mut Figures) -> Result<(), String> {
    let tester = Tester::from_ca(
        mesh,
        "tester",
        "tester-reliability",
        Duration::from_secs(600),
    )
    .await?;
    let mut timings = Vec::new();
    for proxy in [Proxy::Shim, Proxy::Envoy] {
        let Some(pod) = mesh
            .pods()
            .iter()
            .find(|p| p.proxy == proxy && p.mode == Mode::Strict)
            .cloned()
        else {
            continue;
        };
        let started = Instant::now();
        mesh.restart(&pod.proxy_component)
            .await
            .map_err(|e| format!("{} did not come back: {e}", pod.proxy_component))?;
        let serial = agent_cert(mesh, &pod.agent).await?.0;
        let took = eventually(
            Duration::from_secs(10),
            &format!("{} serves its pod's certificate", pod.proxy_component),
            || async {
                let ex = mtls_echo(pod.inbound, &tester, &pod.id, b"after proxy restart\n").await?;
                if ex.server_leaf.serial == serial {
                    Ok(started.elapsed())
                } else {
                    Err(format!(
                        "serves {}, agent holds {serial}",
                        ex.server_leaf.serial
                    ))
                }
            },
        )
        .await?;
        timings.push(format!("{proxy:?} {}", secs(took)));
    }
    let ambient = mesh.ambient().to_vec();
    if let Some(first) = ambient.first() {
        let ztunnel = first.ztunnel.clone();
        let started = Instant::now();
        mesh.restart(&ztunnel)
            .await
            .map_err(|e| format!("{ztunnel} did not come back: {e}"))?;
        for a in ambient.iter().filter(|a| a.ztunnel == ztunnel) {
            let certs = crate::suites::issuance::ztunnel_certs(mesh, &ztunnel).await?;
            ensure(
                certs
                    .iter()
                    .any(|(id, state, _)| id == a.id.as_str() && state == "available"),
                || {
                    format!(
                        "{ztunnel} holds no available certificate for {} after its restart: {certs:?}",
                        a.id
                    )
                },
            )?;
        }
        // Traffic both ways through the restarted ztunnel.
        for a in &ambient {
            if let Some((listen, to)) = &a.outbound {
                eventually(
                    Duration::from_secs(10),
                    &format!("{} -> {to} after the {ztunnel} restart", a.name),
                    || plain_echo(*listen, b"after ztunnel restart\n"),
                )
                .await?;
            }
        }
        timings.push(format!("ztunnel {}", secs(started.elapsed())));
    }
    fig.add("shim, Envoy, ztunnel restarts", |r| {
        r.failed_requests = "0 after each restart".into();
        r.renewal_after = format!("serving again: {}", timings.join(", "));
    });
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Time

/// An agent and a ztunnel frozen (SIGSTOP) until past their rotation point
/// renew as soon as they thaw, and what they serve then has not expired.
async fn frozen_past_rotation(mesh: &mut impl Topology, fig: &mut Figures) -> Result<(), String> {
    let pod = mesh
        .pods()
        .iter()
        .find(|p| p.proxy == Proxy::Shim && p.mode == Mode::Strict)
        .cloned()
        .ok_or("no STRICT shim pod")?;
    let ids: Vec<Ident> = identities(mesh);
    let agent_ix = ids
        .iter()
        .position(|i| i.name == pod.name)
        .ok_or("pod identity")?;
    let ztunnel = mesh
        .ambient()
        .first()
        .map(|a| a.ztunnel.clone())
        .ok_or("no ztunnel")?;
    let chosen: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(n, i)| *n == agent_ix || i.component() == ztunnel)
        .map(|(n, _)| n)
        .collect();
    let before: Vec<IdState> = {
        let mut v = Vec::new();
        for n in &chosen {
            v.push(id_state(mesh, &ids[*n]).await?);
        }
        v
    };
    let latest = before
        .iter()
        .filter_map(|s| s.next_refresh)
        .max()
        .ok_or("no rotation point")?;
    let tester = Tester::from_ca(
        mesh,
        "tester",
        "tester-reliability",
        Duration::from_secs(600),
    )
    .await?;
    mesh.pause(&pod.agent).await.map_err(|e| e.to_string())?;
    let frozen = mesh.pause(&ztunnel).await;
    if let Err(e) = frozen {
        let _ = mesh.resume(&pod.agent).await;
        return Err(e.to_string());
    }
    let wait = (latest + 2 - now_unix()).max(1) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let r1 = mesh.resume(&pod.agent).await;
    let r2 = mesh.resume(&ztunnel).await;
    let thawed = Instant::now();
    r1.and(r2).map_err(|e| e.to_string())?;
    // Right after the thaw: the pod serves a certificate that verifies now.
    let first = mtls_echo(pod.inbound, &tester, &pod.id, b"thawed\n").await;
    let mut renewed: Vec<Option<Duration>> = vec![None; chosen.len()];
    let mut expired_seen = Vec::new();
    while renewed.iter().any(Option::is_none) && thawed.elapsed() < Duration::from_secs(15) {
        for (k, n) in chosen.iter().enumerate() {
            if renewed[k].is_none() {
                let s = id_state(mesh, &ids[*n]).await?;
                if let Some(na) = s.not_after
                    && na < now_unix()
                {
                    expired_seen.push(format!("{} holds a cert expired at {na}", ids[*n].name));
                }
                if s.serial.is_some() && s.serial != before[k].serial {
                    renewed[k] = Some(thawed.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let slowest = renewed.iter().flatten().max().copied().unwrap_or_default();
    fig.add("agent + ztunnel frozen past rotation", |r| {
        r.failed_requests = if first.is_ok() {
            "0 right after the thaw".into()
        } else {
            "1 right after the thaw".into()
        };
        r.renewal_after = format!("≤ {} after SIGCONT (frozen {wait} s)", secs(slowest));
    });
    first.map_err(|e| format!("{} right after the thaw: {e}", pod.name))?;
    ensure(expired_seen.is_empty(), || expired_seen.join("; "))?;
    for (k, n) in chosen.iter().enumerate() {
        let took = renewed[k]
            .ok_or_else(|| format!("{} did not renew within 15 s of the thaw", ids[*n].name))?;
        ensure(took <= Duration::from_secs(3), || {
            format!(
                "{} renewed {} after the thaw: not at once",
                ids[*n].name,
                secs(took)
            )
        })?;
    }
    Ok(())
}

/// The pod's token file is replaced by an expired token: at its rotation
/// point the agent reports a clear error (the CA refuses an expired token),
/// keeps serving its current certificate, and renews once a good token is
/// back, before that certificate expires.
async fn expired_token(mesh: &mut impl Topology, fig: &mut Figures) -> Result<(), String> {
    let pod = mesh
        .pods()
        .iter()
        .find(|p| p.proxy == Proxy::Shim && p.mode == Mode::Permissive)
        .or_else(|| mesh.pods().iter().find(|p| p.proxy == Proxy::Shim))
        .cloned()
        .ok_or("no shim pod")?;
    let ident = identities(mesh)
        .into_iter()
        .find(|i| i.name == pod.name)
        .ok_or("pod identity")?;
    let tester = Tester::from_ca(
        mesh,
        "tester",
        "tester-reliability",
        Duration::from_secs(600),
    )
    .await?;
    // Start right after a rotation, so the whole life is ahead.
    let first = agent_cert(mesh, &pod.agent).await?.0;
    eventually(mesh.ttl(), "the agent rotates", || async {
        let s = agent_cert(mesh, &pod.agent).await?.0;
        if s != first { Ok(()) } else { Err(s) }
    })
    .await?;
    let (serial, _, not_after) = agent_cert(mesh, &pod.agent).await?;
    let expired = mesh
        .expired_token_for(
            &pod.namespace,
            &pod.service_account,
            &pod.name,
            Duration::from_secs(60),
        )
        .map_err(|e| e.to_string())?;
    mesh.set_pod_token(&pod.name, &expired)
        .await
        .map_err(|e| e.to_string())?;
    let outcome = async {
        let error = eventually(
            mesh.ttl() / 2 + Duration::from_secs(5),
            "the agent reports the refused token",
            || async {
                let s = id_state(mesh, &ident).await?;
                match s.last_error {
                    Some(e) => Ok(e),
                    None => Err("no error yet".into()),
                }
            },
        )
        .await?;
        ensure(error.to_lowercase().contains("expired"), || {
            format!("the agent's error does not say the token expired: {error}")
        })?;
        let held = agent_cert(mesh, &pod.agent).await?.0;
        ensure(held == serial, || {
            format!("the agent dropped its certificate {serial} (now {held})")
        })?;
        let ex = mtls_echo(pod.inbound, &tester, &pod.id, b"expired token\n").await?;
        ensure(ex.server_leaf.serial == serial, || {
            format!(
                "the proxy serves {} instead of the kept {serial}",
                ex.server_leaf.serial
            )
        })?;
        Ok::<String, String>(error)
    }
    .await;
    // The good token comes back in any case (later suites use this pod).
    let good = mesh
        .token_for(&pod.namespace, &pod.service_account, &pod.name)
        .await
        .map_err(|e| e.to_string())?;
    mesh.set_pod_token(&pod.name, &good)
        .await
        .map_err(|e| e.to_string())?;
    let back = Instant::now();
    let renewed = eventually(
        DEFAULT_MAX_BACKOFF + Duration::from_secs(5),
        "the agent renews with the good token",
        || async {
            let s = agent_cert(mesh, &pod.agent).await?;
            if s.0 != serial {
                Ok(s)
            } else {
                Err(format!("still {serial}"))
            }
        },
    )
    .await;
    let took = back.elapsed();
    fig.add("expired token, then a good one", |r| {
        r.failed_requests = if outcome.is_ok() {
            "0 (cert kept)".into()
        } else {
            "see case".into()
        };
        r.renewal_after = format!("{} after the good token", secs(took));
    });
    let error = outcome?;
    eprintln!("    agent error on the expired token: {error}");
    let (_, nb, _) = renewed?;
    ensure(nb + 120 <= not_after + 1, || {
        format!(
            "the agent renewed only {} after the good token came back, after its certificate expired",
            secs(took)
        )
    })
}

/// istiod backdates NotBefore by two minutes so that a peer whose clock is
/// behind accepts a fresh certificate. A certificate the CA just issued
/// verifies with the workspace's verifier at a clock two minutes behind,
/// and (the check can fail) not at a clock further behind than its NotBefore.
async fn backdated_not_before(mesh: &mut impl Topology, fig: &mut Figures) -> Result<(), String> {
    let issued_at = SystemTime::now();
    let tester = Tester::from_ca(mesh, "tester", "tester-clock", Duration::from_secs(600)).await?;
    let leaf = tester.creds.svid.leaf().clone();
    let backdate = issued_at
        .duration_since(leaf.not_before)
        .map_err(|_| "the leaf's NotBefore is after the request was sent".to_string())?;
    fig.add("peer clock 2 min behind", |r| {
        r.failed_requests = "0".into();
        r.renewal_after = format!("NotBefore backdated {}", secs(backdate));
    });
    ensure(backdate >= Duration::from_secs(118), || {
        format!(
            "NotBefore is only {} before issuance; istiod backdates 2 min",
            secs(backdate)
        )
    })?;
    let behind = SystemTime::now() - Duration::from_secs(120);
    tester
        .creds
        .bundle
        .verify(tester.creds.svid.chain(), Usage::ServerAuth, behind)
        .map_err(|e| format!("a peer 2 min behind refuses a fresh certificate: {e}"))?;
    ensure(
        tester
            .creds
            .bundle
            .verify(
                tester.creds.svid.chain(),
                Usage::ServerAuth,
                leaf.not_before - Duration::from_secs(5),
            )
            .is_err(),
        || "the verifier accepts a certificate before its NotBefore".into(),
    )
}

// ---------------------------------------------------------------------------
// 4. Load: in-process identity workers against the real CA

/// How big the load cases are.
#[derive(Clone, Debug)]
pub struct LoadSize {
    /// Workloads renewing with a 10 s TTL.
    pub workloads: usize,
    /// For how long.
    pub duration: Duration,
    /// Workloads starting at once.
    pub burst: usize,
}

impl LoadSize {
    fn from_env() -> Self {
        let num = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(d)
        };
        LoadSize {
            workloads: num("MESHID_RELIABILITY_WORKLOADS", 20) as usize,
            duration: Duration::from_secs(num("MESHID_RELIABILITY_SECONDS", 20)),
            burst: num("MESHID_RELIABILITY_BURST", 100) as usize,
        }
    }
}

/// The TTL of the load workloads.
const LOAD_TTL: Duration = Duration::from_secs(10);

/// A copy of one of the log's lists (empty if a worker panicked holding it).
fn copied<T: Clone>(list: &Mutex<Vec<T>>) -> Vec<T> {
    list.lock().map(|v| v.clone()).unwrap_or_default()
}

/// What the workers of one load case did, shared with each of them.
#[derive(Debug, Default)]
struct LoadLog {
    sent: AtomicU64,
    /// (worker, when) of every CSR sent.
    sent_at: Mutex<Vec<(usize, Instant)>>,
    failed: AtomicU64,
    /// (worker, when) of every certificate accepted.
    issued: Mutex<Vec<(usize, Instant)>>,
    /// How long each answered CSR took.
    latency: Mutex<Vec<Duration>>,
    errors: Mutex<Vec<String>>,
    /// Failed CSRs that were not the client's own deadline (a refusal, an
    /// unavailable CA): what a storm must not cause.
    refused: AtomicU64,
}

/// One worker's view of the log (knows its index).
#[derive(Debug)]
struct WorkerLog {
    n: usize,
    log: Arc<LoadLog>,
}

impl RenewalEvents for WorkerLog {
    fn csr_sent(&self) {
        self.log.sent.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut v) = self.log.sent_at.lock() {
            v.push((self.n, Instant::now()));
        }
    }
    fn csr_failed(&self) {
        self.log.failed.fetch_add(1, Ordering::Relaxed);
    }
    fn issued(&self) {
        if let Ok(mut v) = self.log.issued.lock() {
            v.push((self.n, Instant::now()));
        }
    }
}

/// The real CA source, timed.
#[derive(Debug)]
struct Timed {
    inner: CaSource,
    log: Arc<LoadLog>,
}

impl CertificateSource for Timed {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, meshid_common::Result<Vec<String>>> {
        Box::pin(async move {
            let started = Instant::now();
            let r = self.inner.sign(req).await;
            match &r {
                Ok(_) => {
                    if let Ok(mut v) = self.log.latency.lock() {
                        v.push(started.elapsed());
                    }
                }
                Err(e) => {
                    let deadline = matches!(
                        e,
                        meshid_common::Error::Ca {
                            code: tonic::Code::DeadlineExceeded,
                            ..
                        }
                    );
                    if !deadline {
                        self.log.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Ok(mut v) = self.log.errors.lock()
                        && v.len() < 5
                    {
                        v.push(e.to_string());
                    }
                }
            }
            r
        })
    }
}

/// `count` workloads `load/<prefix>-<n>`, each a [`Worker`] with its own CA
/// connection and token file, started at once.
struct Fleet {
    workers: Vec<Arc<Worker>>,
    log: Arc<LoadLog>,
    cancel: CancellationToken,
    started: Instant,
    dir: PathBuf,
}

impl Fleet {
    async fn start(mesh: &mut impl Topology, prefix: &str, count: usize) -> Result<Self, String> {
        Self::start_with_ttl(mesh, prefix, count, LOAD_TTL).await
    }

    /// [`Fleet::start`] asking for `ttl` certificates.
    async fn start_with_ttl(
        mesh: &mut impl Topology,
        prefix: &str,
        count: usize,
        ttl: Duration,
    ) -> Result<Self, String> {
        let pods: Vec<(String, String)> = (0..count)
            .map(|n| (format!("{prefix}-{n}"), format!("{prefix}-{n}")))
            .collect();
        let tokens = mesh
            .register_pods("load", &pods)
            .await
            .map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!("meshid-load-{prefix}-{}", std::process::id()));
        let write = |p: &std::path::Path, s: &str| {
            std::fs::create_dir_all(p.parent().expect("parent"))
                .and_then(|_| std::fs::write(p, s))
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let root = dir.join("root-cert.pem");
        write(&root, &mesh.ca_root_pem().map_err(|e| e.to_string())?)?;
        let log = Arc::new(LoadLog::default());
        let cancel = CancellationToken::new();
        let mut workers = Vec::with_capacity(count);
        let mut settings_list = Vec::with_capacity(count);
        for (n, ((pod, sa), token)) in pods.iter().zip(&tokens).enumerate() {
            let token_path = dir.join(format!("{pod}.token"));
            write(&token_path, token)?;
            let settings = CaClientArgs {
                ca_address: Some(mesh.ca_address()),
                ca_root_ca: Some(root.clone()),
                token_path: Some(token_path.clone()),
                secret_ttl: Some(format!("{}s", ttl.as_secs())),
                ..CaClientArgs::default()
            }
            .resolve(&HashMap::<String, String>::new())
            .map_err(|e| e.to_string())?;
            let id = SpiffeId::for_service_account(mesh.trust_domain(), "load", sa)
                .map_err(|e| e.to_string())?;
            settings_list.push((n, id, settings, token_path));
        }
        let started = Instant::now();
        for (n, id, settings, token_path) in settings_list {
            let source = Timed {
                inner: CaSource::new(&settings).map_err(|e| e.to_string())?,
                log: log.clone(),
            };
            let worker = Worker::new(
                WorkerConfig {
                    id,
                    key_type: KeyType::EcdsaP256,
                    ttl: settings.ttl,
                    policy: settings.policy,
                    ca_timeout: settings.ca_timeout,
                    on_behalf: false,
                    first_fetch: FirstFetch::Now,
                    span: |_, _, _| tracing::Span::none(),
                },
                WorkerParts {
                    source: Arc::new(source),
                    token: TokenFile::new(token_path),
                    clock: Clock::System,
                    events: Arc::new(WorkerLog {
                        n,
                        log: log.clone(),
                    }),
                    limiter: None,
                },
            );
            tokio::spawn(worker.clone().run(cancel.clone()));
            workers.push(worker);
        }
        Ok(Fleet {
            workers,
            log,
            cancel,
            started,
            dir,
        })
    }

    /// When each worker got its first certificate (since the start).
    fn first_certs(&self) -> Vec<Option<Duration>> {
        let mut out = vec![None; self.workers.len()];
        for (n, at) in copied(&self.log.issued) {
            if out[n].is_none() {
                out[n] = Some(at - self.started);
            }
        }
        out
    }

    /// Waits until every worker has a certificate; how long that took
    /// since the start, or `None` if `within` passed first.
    async fn wait_first_certs(&self, within: Duration) -> Option<Duration> {
        loop {
            let firsts = self.first_certs();
            if firsts.iter().all(Option::is_some) {
                return firsts.into_iter().flatten().max();
            }
            if self.started.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(&self) {
        self.cancel.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// p50 and p99 of the answered CSRs.
    fn percentiles(&self) -> (Duration, Duration, usize) {
        let mut v = copied(&self.log.latency);
        v.sort();
        let at = |q: f64| {
            v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        (at(0.5), at(0.99), v.len())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tiny deterministic generator for picking pairs (no rand dependency).
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// One mTLS handshake between two workers' current credentials, in memory.
async fn handshake(client: &Worker, server: &Worker, td: &str) -> Result<(), String> {
    let server_cfg = tls::server_config(
        server.credentials(),
        PeerMatcher::TrustDomain(td.into()),
        ClientAuth::Required,
    )
    .map_err(|e| e.to_string())?;
    let client_cfg = tls::client_config(
        client.credentials(),
        PeerMatcher::Exact(server.id().clone()),
    )
    .map_err(|e| e.to_string())?;
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let both = async {
        let (a, b) = tokio::join!(
            acceptor.accept(s),
            connector.connect(tls::sni_for(server.id()), c)
        );
        a.map_err(|e| format!("server side: {e}"))?;
        b.map_err(|e| format!("client side: {e}"))?;
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .map_err(|_| "handshake timed out".to_string())?
}

/// Renewals per half-second since the start, as a one-line histogram.
fn renewal_histogram(
    issued: &[(usize, Instant)],
    started: Instant,
    span: Duration,
) -> (String, usize) {
    let buckets = (span.as_secs_f64() / 0.5).ceil() as usize + 1;
    let mut counts = vec![0usize; buckets];
    let mut seen = std::collections::HashSet::new();
    for (n, at) in issued {
        // Renewals only: the first certificate of each worker is the start.
        if !seen.insert(*n) {
            let b = ((*at - started).as_secs_f64() / 0.5) as usize;
            if let Some(c) = counts.get_mut(b) {
                *c += 1;
            }
        }
    }
    let peak = counts.iter().copied().max().unwrap_or(0);
    let line = counts
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    (line, peak)
}

/// `workloads` workers renew 10 s certificates for `duration`: no CSR fails,
/// no handshake between random pairs fails, every worker renews about every
/// 5 s, and the CA's answers stay quick (p99 reported, bounded at 5 s).
async fn load_steady(
    mesh: &mut impl Topology,
    fig: &mut Figures,
    size: &LoadSize,
) -> Result<(), String> {
    let td = mesh.trust_domain().to_owned();
    let fleet = Fleet::start(mesh, "steady", size.workloads).await?;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ now_unix() as u64;
    let (mut handshakes, mut failed_hs) = (0usize, Vec::new());
    // Let every first certificate arrive, then renew and check pairs for
    // the whole duration.
    let all_in = fleet.wait_first_certs(Duration::from_secs(60)).await;
    ensure(all_in.is_some(), || {
        format!(
            "not every workload got its first certificate within 60 s; errors: {:?}",
            copied(&fleet.log.errors)
        )
    })?;
    let end = Instant::now() + size.duration;
    while Instant::now() < end {
        for _ in 0..5 {
            let n = fleet.workers.len() as u64;
            let (a, b) = (
                (next_rand(&mut rng) % n) as usize,
                (next_rand(&mut rng) % n) as usize,
            );
            handshakes += 1;
            if let Err(e) = handshake(&fleet.workers[a], &fleet.workers[b], &td).await {
                failed_hs.push(format!(
                    "{} -> {}: {e}",
                    fleet.workers[a].id(),
                    fleet.workers[b].id()
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    fleet.stop();
    let issued = copied(&fleet.log.issued);
    let per_worker = |n: usize| issued.iter().filter(|(w, _)| *w == n).count();
    let fewest = (0..fleet.workers.len()).map(per_worker).min().unwrap_or(0);
    let (p50, p99, answered) = fleet.percentiles();
    let (histogram, peak) = renewal_histogram(&issued, fleet.started, fleet.started.elapsed());
    let failed = fleet.log.failed.load(Ordering::Relaxed);
    let sent = fleet.log.sent.load(Ordering::Relaxed);
    println!(
        "    load: {} workloads x {}: renewals per 0.5 s: {histogram}",
        size.workloads,
        secs(size.duration)
    );
    fig.add(
        &format!(
            "load: {} workloads, TTL 10 s, {}",
            size.workloads,
            secs(size.duration)
        ),
        |r| {
            r.failed_requests = format!(
                "{} of {sent} CSRs, {} of {handshakes} handshakes",
                failed,
                failed_hs.len()
            );
            r.ca_requests_per_workload = format!(
                "{:.1} (fewest certs {fewest})",
                sent as f64 / size.workloads as f64
            );
            r.renewal_after = format!("peak {peak} renewals / 0.5 s");
            r.ca_p99 = format!(
                "p50 {} ms, p99 {} ms ({answered})",
                p50.as_millis(),
                p99.as_millis()
            );
        },
    );
    ensure(failed == 0, || {
        format!(
            "{failed} of {sent} CSRs failed under load; e.g. {:?}",
            copied(&fleet.log.errors)
        )
    })?;
    ensure(failed_hs.is_empty(), || {
        format!(
            "{} of {handshakes} handshakes failed; first: {}",
            failed_hs.len(),
            failed_hs[0]
        )
    })?;
    // Every worker renews about every half-TTL (allow one missed window).
    let expected = (size.duration.as_secs_f64() / (LOAD_TTL.as_secs_f64() / 2.0)).floor() as usize;
    ensure(fewest + 1 >= expected, || {
        format!(
            "a worker got only {fewest} certificates in {}, expected about {expected}",
            secs(size.duration)
        )
    })?;
    ensure(p99 <= Duration::from_secs(5), || {
        format!("CA p99 {} ms under load", p99.as_millis())
    })
}

/// The burst's certificates live long enough that no worker renews while
/// the others still wait for their first (with the steady case's 10 s, a
/// storm slower than 5 s doubles itself with renewals).
const BURST_TTL: Duration = Duration::from_secs(600);

/// `burst` workloads start at once: every one gets a certificate within a
/// minute, and the CA queues rather than refuses: no CSR fails, neither
/// refused nor past the client's 10 s deadline.
async fn load_burst(
    mesh: &mut impl Topology,
    fig: &mut Figures,
    size: &LoadSize,
) -> Result<(), String> {
    let fleet = Fleet::start_with_ttl(mesh, "burst", size.burst, BURST_TTL).await?;
    let deadline = Duration::from_secs(60);
    fleet.wait_first_certs(deadline).await;
    fleet.stop();
    let firsts = fleet.first_certs();
    let got = firsts.iter().filter(|f| f.is_some()).count();
    let done = firsts.iter().flatten().max().copied().unwrap_or_default();
    let (p50, p99, answered) = fleet.percentiles();
    let failed = fleet.log.failed.load(Ordering::Relaxed);
    let refused = fleet.log.refused.load(Ordering::Relaxed);
    let sent = fleet.log.sent.load(Ordering::Relaxed);
    fig.add(&format!("burst: {} workloads at once", size.burst), |r| {
        r.failed_requests = format!(
            "{failed} of {sent} CSRs ({} hit the 10 s client deadline, {refused} other); {got} of {} got a cert",
            failed.saturating_sub(refused),
            size.burst
        );
        r.ca_requests_per_workload = format!("{:.2}", sent as f64 / size.burst as f64);
        r.storm_completion = secs(done);
        r.ca_p99 = format!(
            "p50 {} ms, p99 {} ms ({answered})",
            p50.as_millis(),
            p99.as_millis()
        );
    });
    ensure(got == size.burst, || {
        format!(
            "only {got} of {} workloads got a certificate within {}; errors: {:?}",
            size.burst,
            secs(deadline),
            copied(&fleet.log.errors)
        )
    })?;
    ensure(refused == 0, || {
        format!(
            "{refused} CSRs failed in the burst other than by the client's deadline (refused rather than queued): {:?}",
            copied(&fleet.log.errors)
        )
    })?;
    ensure(failed == 0, || {
        format!(
            "{failed} of {sent} CSRs in the burst waited past the client's 10 s deadline: {:?}",
            copied(&fleet.log.errors)
        )
    })
}

// ---------------------------------------------------------------------------
// 5. CA restart with renewals in flight

/// `workloads` workers (N, as in the steady load) renew 10 s certificates;
/// the CA is stopped just before their first renewals fall due and started
/// again (same root) once they have all fallen due, so every renewal is cut
/// or refused by the restart. Meanwhile 5 random pairs handshake every
/// 200 ms. Every worker must renew by the retry it had scheduled when the
/// CA returned (its backoff) + 5 s (reconnect, the CA's answer under the wave);
/// no handshake between certificates valid at that moment may fail; every
/// worker must end with a valid certificate; and no worker may send more
/// CSRs than its scheduled renewals plus a capped exponential backoff's
/// retries (no tight retry loop).
async fn ca_restart_under_load(
    mesh: &mut impl Topology,
    fig: &mut Figures,
    size: &LoadSize,
) -> Result<(), String> {
    let td = mesh.trust_domain().to_owned();
    let fleet = Fleet::start(mesh, "restart", size.workloads).await?;
    let errors = |fleet: &Fleet| copied(&fleet.log.errors);
    ensure(
        fleet
            .wait_first_certs(Duration::from_secs(60))
            .await
            .is_some(),
        || {
            format!(
                "not every workload got its first certificate within 60 s; errors: {:?}",
                errors(&fleet)
            )
        },
    )?;
    // Down from just before the first renewal to just after the last, as
    // the workers scheduled them: at half the life each sees, which is not
    // half a TTL after the certificate arrived. NotAfter is a whole second,
    // so the life seen is up to 1 s shorter and the renewal up to 0.5 s
    // earlier (a window reckoned from the arrivals missed renewals that ran
    // before the stop).
    let half = LOAD_TTL / 2;
    let mut scheduled_at = Vec::new();
    for _ in 0..20 {
        scheduled_at = fleet
            .workers
            .iter()
            .filter_map(|w| w.status().next_refresh)
            .collect::<Vec<_>>();
        if scheduled_at.len() == fleet.workers.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure(scheduled_at.len() == fleet.workers.len(), || {
        format!(
            "{} of {} workers have a certificate but no renewal scheduled",
            fleet.workers.len() - scheduled_at.len(),
            fleet.workers.len()
        )
    })?;
    let first_due = scheduled_at
        .iter()
        .min()
        .copied()
        .unwrap_or_else(SystemTime::now);
    let last_due = scheduled_at
        .iter()
        .max()
        .copied()
        .unwrap_or_else(SystemTime::now);
    let stop_at = Clock::System.instant_at(first_due) - Duration::from_millis(500);
    let start_at = Clock::System.instant_at(last_due) + Duration::from_millis(500);

    let stop = Arc::new(AtomicBool::new(false));
    let pairs = {
        let (stop, workers, td) = (stop.clone(), fleet.workers.clone(), td.clone());
        tokio::spawn(async move {
            let mut rng = 0x2545_f491_4f6c_dd1du64 ^ now_unix() as u64;
            let (mut done, mut excused, mut failed) = (0usize, 0usize, Vec::new());
            let n = workers.len() as u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..5 {
                    let (a, b) = (
                        &workers[(next_rand(&mut rng) % n) as usize],
                        &workers[(next_rand(&mut rng) % n) as usize],
                    );
                    // Only certificates valid at this moment count.
                    if a.current_valid().is_none() || b.current_valid().is_none() {
                        excused += 1;
                        continue;
                    }
                    done += 1;
                    if let Err(e) = handshake(a, b, &td).await {
                        failed.push(format!("{} -> {}: {e}", a.id(), b.id()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (done, excused, failed)
        })
    };

    tokio::time::sleep_until(stop_at).await;
    let down_at = Instant::now();
    // The old CA has exited once `stop` returns, so whatever is issued from
    // the relaunch on comes from the new one. Its renewals are timed from
    // the relaunch, not from `start`'s return: the CA serves before the
    // harness's readiness poll (every 100 ms) sees it, and a worker whose
    // retry fell in between renewed before `back_at`; timed from `back_at`,
    // its first renewal "after the return" was its next scheduled one, half
    // a TTL later (the 3.7 to 5.0 s once reported here).
    let mut relaunch_at = down_at;
    let outcome = async {
        mesh.stop("ca").await.map_err(|e| e.to_string())?;
        tokio::time::sleep_until(start_at).await;
        relaunch_at = Instant::now();
        mesh.start("ca").await.map_err(|e| e.to_string())
    }
    .await;
    let back_at = Instant::now();
    let down = back_at - down_at;
    let startup = back_at - relaunch_at;
    outcome?;
    // Each worker must renew by the retry it had scheduled when the CA came
    // back (its backoff), plus 2 s for the CA's answer under the wave: the
    // answers themselves take milliseconds, the CA client reconnects at
    // once (`a_client_reaches_a_restarted_ca_promptly` in meshid-ca).
    let now = SystemTime::now();
    let slack = Duration::from_secs(2);
    let due: Vec<Duration> = fleet
        .workers
        .iter()
        .map(|w| {
            w.status()
                .next_refresh
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or_default()
                + slack
                + startup
        })
        .collect();
    let bound = due.iter().max().copied().unwrap_or(slack);
    let renewed_after = |fleet: &Fleet| {
        let issued = copied(&fleet.log.issued);
        (0..fleet.workers.len())
            .map(|w| {
                issued
                    .iter()
                    .filter(|(n, at)| *n == w && *at >= relaunch_at)
                    .map(|(_, at)| *at - relaunch_at)
                    .min()
            })
            .collect::<Vec<_>>()
    };
    while renewed_after(&fleet).iter().any(Option::is_none) && relaunch_at.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little more of steady renewal and handshakes after the wave.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (done, excused, failed_hs) = pairs.await.map_err(|e| e.to_string())?;
    let end = Instant::now();
    let after = renewed_after(&fleet);
    let renewed = after
        .iter()
        .zip(&due)
        .filter(|(at, due)| at.is_some_and(|at| at <= **due))
        .count();
    let slowest = after.iter().flatten().max().copied().unwrap_or_default();
    let invalid: Vec<String> = fleet
        .workers
        .iter()
        .filter(|w| w.current_valid().is_none())
        .map(|w| w.id().to_string())
        .collect();
    fleet.stop();

    // CSRs per worker from the stop to the end: its scheduled renewals in
    // that window plus the retries of a capped exponential backoff through
    // the outage (first retry after 375 ms at the lowest jitter).
    let sent_at = copied(&fleet.log.sent_at);
    let per_worker: Vec<usize> = (0..fleet.workers.len())
        .map(|w| {
            sent_at
                .iter()
                .filter(|(n, at)| *n == w && *at >= down_at)
                .count()
        })
        .collect();
    let in_outage = (0..fleet.workers.len())
        .filter(|w| {
            sent_at
                .iter()
                .any(|(n, at)| n == w && *at >= down_at && *at < relaunch_at)
        })
        .count();
    let most = per_worker.iter().copied().max().unwrap_or(0);
    let mean = per_worker.iter().sum::<usize>() as f64 / per_worker.len().max(1) as f64;
    // Renewals come every half life seen: 4.5 to 5 s (the whole-second
    // NotAfter), less 1 % jitter.
    let shortest_interval = half.as_secs_f64() - 0.5;
    let scheduled = ((end - down_at).as_secs_f64() / (shortest_interval * 0.99)).ceil() as usize;
    let retries = 2 + (down.as_secs_f64() / 0.375).log2().ceil().max(0.0) as usize;
    let csr_bound = scheduled + retries;
    let n = size.workloads;
    println!(
        "    CA restart under load: {n} workloads, CA down {}, {in_outage} sent a CSR while it was down; renewed after its relaunch: {renewed} of {n}, slowest {} (it reported ready after {}); CSRs per workload max {most} (bound {csr_bound}), mean {mean:.1}; handshakes {} failed of {done} ({excused} skipped: a cert not valid then)",
        secs(down),
        secs(slowest),
        secs(startup),
        failed_hs.len()
    );
    fig.add(
        &format!(
            "CA restart (down {}) with {n} workloads renewing",
            secs(down)
        ),
        |r| {
            r.failed_requests = format!(
                "{} of {done} handshakes; {} of {n} ended without a valid cert",
                failed_hs.len(),
                invalid.len()
            );
            r.renewal_after = format!(
                "all {renewed} of {n} ≤ {} after the CA's relaunch (ready after {})",
                secs(slowest),
                secs(startup)
            );
            r.ca_requests_per_workload = format!(
                "max {most} (bound {csr_bound}), mean {mean:.1}; {in_outage} of {n} in the outage"
            );
        },
    );
    ensure(in_outage * 2 >= n, || {
        format!(
            "only {in_outage} of {n} workloads sent a CSR while the CA was down: the restart missed the renewals"
        )
    })?;
    ensure(renewed == n, || {
        format!(
            "{} of {n} workloads did not renew by their scheduled retry + {} after the CA's return (the latest due {} after its relaunch); errors: {:?}",
            n - renewed,
            secs(slack),
            secs(bound),
            errors(&fleet)
        )
    })?;
    ensure(failed_hs.is_empty(), || {
        format!(
            "{} of {done} handshakes between valid certificates failed; first: {}",
            failed_hs.len(),
            failed_hs[0]
        )
    })?;
    ensure(invalid.is_empty(), || {
        format!(
            "{} workloads ended without a valid certificate, e.g. {}",
            invalid.len(),
            invalid[0]
        )
    })?;
    ensure(most <= csr_bound, || {
        format!(
            "a workload sent {most} CSRs after the CA went down (bound {csr_bound}): a retry loop"
        )
    })
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_capped_backoff_keeps_retrying_at_the_cap() {
        // 0, 0.5, 1.5, then every second to 7.5: 9 in 8 s.
        assert_eq!(attempts_within(8.0, MS(500), MS(1000), 1.0, 0.0), 9);
        // Uncapped (30 s): 0, 0.5, 1.5, 3.5, 7.5: five.
        assert_eq!(attempts_within(8.0, MS(500), MS(30_000), 1.0, 0.0), 5);
        // Shortest delays (25 % jitter): 0, .375, then every .75 s to 7.875: 12.
        assert_eq!(attempts_within(8.0, MS(500), MS(1000), 0.75, 0.0), 12);
        assert_eq!(attempts_within(0.0, MS(500), MS(1000), 1.0, 0.0), 0);
    }

    #[test]
    fn the_window_starts_at_the_rotation_point_or_the_outage() {
        assert_eq!(rotation_start(100.0, Some(105), false), 105.0);
        assert!((rotation_start(100.0, Some(105), true) - 106.3).abs() < 1e-9);
        assert_eq!(rotation_start(100.0, Some(90), true), 100.0);
        assert_eq!(rotation_start(100.0, None, false), 100.0);
        // About 13.7 s at a 1 s cap: at least 13, at most 20.
        let (lo, hi) = FailWindow {
            first_early: 105.0,
            first_late: 106.3,
            end_early: 120.0,
            end_late: 120.5,
        }
        .attempts(MS(500), MS(1000));
        assert!(lo >= 12 && hi <= 25 && lo < hi, "{lo} {hi}");
    }
}

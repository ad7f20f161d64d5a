//! 200 workloads on each node with 4-second certificates: while every
//! certificate rotates (every ~2 s) and pooled connections are replaced
//! before their certificates expire, no connection fails.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshid_common::registry::Registry;
use support::*;

const WORKLOADS: usize = 200;
const TTL: Duration = Duration::from_secs(4);
const RUN_FOR: Duration = Duration::from_secs(9);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_workloads_rotate_without_a_failed_connection() {
    let mut registry = Registry::default();
    let mut dests = Vec::new();
    for i in 0..WORKLOADS {
        let src = closed_port("127.0.0.1").await;
        registry.upsert_workload(pod(&format!("src-{i}"), &format!("src-{i}"), "node-a", src));
        let dst = echo_server("127.0.0.2").await;
        registry.upsert_workload(pod(&format!("dst-{i}"), &format!("dst-{i}"), "node-b", dst));
        dests.push(dst);
    }
    let mesh = Mesh::start(registry, Vec::new(), TTL).await;
    let mut routes = Vec::new();
    for (i, dst) in dests.iter().enumerate() {
        routes.push(mesh.route_a(&format!("src-{i}"), *dst).await);
    }
    let first_serials: Vec<String> = (0..WORKLOADS)
        .map(|i| {
            mesh.a
                .certs()
                .current(&mesh.id(&format!("src-{i}")))
                .unwrap()
                .svid
                .leaf()
                .serial
                .clone()
        })
        .collect();

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < RUN_FOR {
        let mut tasks = Vec::with_capacity(WORKLOADS);
        for (i, route) in routes.iter().enumerate() {
            let (route, ok, failed) = (*route, ok.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let msg = format!("round {rounds} workload {i}");
                match echo_through(route, msg.as_bytes()).await {
                    Ok(back) if back == msg.as_bytes() => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        eprintln!("workload {i} round {rounds}: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        rounds += 1;
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!(
        "{rounds} rounds, {ok} connections, {failed} failed, fetches a={} b={}, pool connections a={}",
        mesh.source_a.calls().len(),
        mesh.source_b.calls().len(),
        mesh.a.metrics().hbone_pool_connections.get()
    );
    assert_eq!(failed, 0, "no connection may fail during rotation");
    assert!(rounds >= 3, "traffic kept flowing: {rounds} rounds");
    // Every source certificate was replaced at least twice (4 s life, renewed at ~2 s).
    assert!(
        mesh.source_a.calls().len() >= 3 * WORKLOADS,
        "rotations on node-a: {}",
        mesh.source_a.calls().len()
    );
    for (i, first) in first_serials.iter().enumerate() {
        let now = mesh
            .a
            .certs()
            .current(&mesh.id(&format!("src-{i}")))
            .unwrap();
        assert_ne!(&now.svid.leaf().serial, first, "src-{i} rotated");
    }
    // Pooled connections were replaced as their certificates neared expiry.
    assert!(mesh.a.metrics().hbone_pool_connections.get() > WORKLOADS as u64);
}

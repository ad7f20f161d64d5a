//! The app of every docker-backend pod, run in the pod's sandbox container
//! (the owner of the pod's network namespace): a TCP echo server on
//! `--listen`, plus `--forward LISTEN=TARGET` relays that stand in for
//! `kubectl port-forward` to the ports the pod's proxies bind on loopback only.

use std::net::SocketAddr;

use clap::Parser;
use meshid_tests::backend::docker::forward::{Forward, Relay};
use meshid_tests::echo::Echo;

#[derive(Debug, Parser)]
#[command(
    name = "meshid-echo",
    about = "TCP echo app with port-forward relays, for e2e pods"
)]
struct Args {
    /// Where the echo server listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Relay LISTEN to TARGET, e.g. 0.0.0.0:25000=127.0.0.1:15000 (repeatable).
    #[arg(long = "forward", value_name = "LISTEN=TARGET")]
    forwards: Vec<Forward>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let echo = Echo::start(args.listen).await?;
        println!("meshid-echo: echo on {}", echo.addr);
        let mut relays = Vec::new();
        for f in args.forwards {
            relays.push(Relay::start(f).await?);
            println!("meshid-echo: forwarding {f}");
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        drop(relays);
        drop(echo);
        anyhow::Ok(())
    })
}

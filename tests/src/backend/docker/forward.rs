//! The pod sandbox's stand-in for `kubectl port-forward`. A pod's proxies
//! bind their admin APIs and outbound listeners on loopback only (the shim
//! refuses anything else), which Docker's published ports cannot reach; the
//! sandbox, owner of the pod's network namespace, relays `LISTEN` on the
//! pod's address to `TARGET` on its loopback, as the kubelet does for
//! port-forward.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One `LISTEN=TARGET` relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl FromStr for Forward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, target) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not LISTEN=TARGET"))?;
        let parse = |what: &str, a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("{what} {a:?} in {s:?}: {e}"))
        };
        Ok(Forward {
            listen: parse("LISTEN", listen)?,
            target: parse("TARGET", target)?,
        })
    }
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.listen, self.target)
    }
}

/// A running relay; stops accepting when dropped.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Relay {
    /// Binds `forward.listen` and relays every connection to `forward.target`.
    /// A connection whose target does not answer is closed, as port-forward does.
    pub async fn start(forward: Forward) -> std::io::Result<Self> {
        let listener = TcpListener::bind(forward.listen).await?;
        let addr = listener.local_addr()?;
        let target = forward.target;
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let connect = TcpStream::connect(target);
                    if let Ok(Ok(mut outbound)) =
                        tokio::time::timeout(Duration::from_secs(5), connect).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Relay { addr, task })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::plain_echo;
    use crate::echo::Echo;

    #[test]
    fn forwards_parse_and_print_back() {
        let f: Forward = "0.0.0.0:25000=127.0.0.1:15000".parse().unwrap();
        assert_eq!(f.listen, "0.0.0.0:25000".parse().unwrap());
        assert_eq!(f.target, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(f.to_string(), "0.0.0.0:25000=127.0.0.1:15000");
        assert!("0.0.0.0:25000".parse::<Forward>().is_err());
        let err = "0.0.0.0:1=localhost:2".parse::<Forward>().unwrap_err();
        assert!(err.contains("TARGET \"localhost:2\""), "{err}");
    }

    #[tokio::test]
    async fn a_relay_reaches_a_loopback_only_server_and_closes_when_it_is_gone() {
        let app = Echo::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let relay = Relay::start(Forward {
            listen: "127.0.0.1:0".parse().unwrap(),
            target: app.addr,
        })
        .await
        .unwrap();
        plain_echo(relay.addr, b"through the relay\n")
            .await
            .unwrap();
        drop(app);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(plain_echo(relay.addr, b"nobody home\n").await.is_err());
    }
}

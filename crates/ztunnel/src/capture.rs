//! Transparent capture: where a network namespace and iptables redirect a
//! workload's connections to the ztunnel (`REDIRECT` to the outbound capture
//! port 15001, or to the plaintext port 15006), the kernel remembers the
//! address the workload dialled; `SO_ORIGINAL_DST` reads it back.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination the client dialled before a `REDIRECT`, or `None` when
/// the connection was not redirected (it came to our own address).
pub fn original_dst(stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
    let local = stream.local_addr()?;
    let sock = socket2::SockRef::from(stream);
    let dst = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    let dst = match dst {
        Ok(a) => a,
        // No conntrack entry: not redirected.
        Err(e) if e.raw_os_error() == Some(2) => return Ok(None),
        Err(e) => return Err(e),
    };
    let dst = dst
        .as_socket()
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST is not an IP address"))?;
    Ok((dst != local).then_some(dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_c, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (s, _) = accepted.unwrap();
        assert_eq!(original_dst(&s).ok().flatten(), None);
    }
}

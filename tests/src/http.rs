//! A minimal HTTP/1.1 GET/POST client for admin endpoints (`/ready`,
//! `/debug/certs`, `/metrics`): one request per connection, no TLS.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Error;

/// Status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// GET `path` from `addr` within `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, Error> {
    request(addr, "GET", path, "", timeout).await
}

/// One request; the server closes the connection after answering.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<Response, Error> {
    let fail = |what: String| Error::Http {
        url: format!("http://{addr}{path}"),
        message: what,
    };
    let run = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .await
            .map_err(|e| fail(e.to_string()))?;
        parse(&raw).ok_or_else(|| fail("malformed HTTP response".into()))
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

fn parse(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Some(Response { status, body })
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        s = rest.get(n + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let r = parse(b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
        assert!(parse(b"garbage").is_none());
    }

    #[tokio::test]
    async fn a_closed_port_is_an_error_naming_the_url() {
        let addr = crate::ports::reserve().unwrap();
        let err = get(addr, "/ready", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(&format!("http://{addr}/ready")),
            "{err}"
        );
    }
}

//! A small HTTP/1.1 JSON client for the Vault API on hyper's connection
//! API: TLS verified against the configured roots (`VAULT_CACERT`), idle
//! keep-alive connections reused (a TLS handshake per certificate would be
//! most of the cost), every call bounded by one deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Largest Vault answer read (a PKI answer is a few kilobytes).
const MAX_BODY: usize = 4 << 20;
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 128;

/// Why a call got no usable answer from Vault: the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum Transport {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
}

/// An answer from Vault.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Vault's `errors` array, joined; else the start of the body.
    pub fn errors(&self) -> String {
        let json = self.json();
        match json.get("errors").and_then(|e| e.as_array()) {
            Some(list) if !list.is_empty() => list
                .iter()
                .map(|e| {
                    e.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| e.to_string())
                })
                .collect::<Vec<_>>()
                .join("; "),
            _ => String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned(),
        }
    }
}

/// The client of one Vault address.
pub struct VaultHttp {
    addr: String,
    host: String,
    port: u16,
    authority: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    timeout: Duration,
}

impl std::fmt::Debug for VaultHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultHttp")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl VaultHttp {
    /// `addr` is `http(s)://host[:port]`; `roots` are needed for https.
    pub fn new(
        addr: &str,
        roots: Option<rustls::RootCertStore>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let uri: http::Uri = addr
            .parse()
            .map_err(|e| format!("--vault-addr {addr:?}: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("--vault-addr {addr:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "--vault-addr {addr:?}: expected http:// or https://"
                ));
            }
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let roots = match roots {
                Some(r) => r,
                None => {
                    return Err("an https --vault-addr needs --vault-ca-cert (VAULT_CACERT)".into());
                }
            };
            let provider = rustls::crypto::CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("--vault-addr host {host:?}: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(VaultHttp {
            addr: addr.trim_end_matches('/').to_owned(),
            authority: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
            host,
            port,
            tls,
            idle: Mutex::new(Vec::new()),
            timeout,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `method /v1/<path>` with an optional token and JSON body, within the
    /// deadline.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, Transport> {
        tokio::time::timeout(self.timeout, self.call_once(method, path, token, body))
            .await
            .map_err(|_| Transport::Timeout(self.timeout))?
    }

    async fn call_once(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, Transport> {
        let failed =
            |what: &str, e: &dyn std::fmt::Display| Transport::Failed(format!("{what}: {e}"));
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| failed("encoding", &e))?),
            None => Bytes::new(),
        };
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("/v1/{}", path.trim_start_matches('/')))
            .header(http::header::HOST, &self.authority)
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = token {
            builder = builder.header("x-vault-token", token);
        }
        let request = builder
            .body(Full::new(bytes))
            .map_err(|e| failed("request", &e))?;
        let mut sender = match self.idle_connection() {
            Some(s) => s,
            None => self.connect().await?,
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| failed("HTTP", &e))?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| failed("reading the answer", &e))?
            .to_bytes();
        self.put_back(sender);
        Ok(Answer { status, body })
    }

    fn idle_connection(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    fn put_back(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    /// Forgets every idle connection (after Vault restarted, say).
    pub fn reset(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Transport> {
        let failed =
            |what: &str, e: &dyn std::fmt::Display| Transport::Failed(format!("{what}: {e}"));
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| failed("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| failed("TLS", &e))?;
                handshake(TokioIo::new(tls)).await
            }
        }
    }
}

async fn handshake<IO>(io: IO) -> Result<SendRequest<Full<Bytes>>, Transport>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Transport::Failed(format!("HTTP: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "Vault connection closed");
        }
    });
    Ok(sender)
}

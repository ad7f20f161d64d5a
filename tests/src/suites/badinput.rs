//! badinput: every bad input we know of, sent to the running mesh — the CA's
//! gRPC port and monitoring port, an agent's SDS socket and Workload API
//! socket and admin port, a ztunnel's HBONE port, a shim's STRICT inbound —
//! as one table, input → expected → observed. A row passes when the server
//! answers as expected (CA refusals also carry a request id and tell no
//! registry fact) and, after its rows, the same server still serves a good
//! request. The table is printed and written to `<run dir>/badinput.md`;
//! docs/RELIABILITY.md keeps a copy.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_ca::token::{TokenClaims, TokenIssuer};
use meshid_common::ca_client::IMPERSONATED_IDENTITY_KEY;
use meshid_common::cert::LeafSpec;
use meshid_common::proto::discovery::DiscoveryRequest;
use meshid_common::proto::envoy_core::Node;
use meshid_common::proto::istio_ca::IstioCertificateRequest;
use meshid_common::proto::jwt_svid::MintJwtSvidRequest;
use meshid_common::proto::jwt_svid::jwt_svid_service_client::JwtSvidServiceClient;
use meshid_common::proto::sds::secret_discovery_service_client::SecretDiscoveryServiceClient;
use meshid_common::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_common::proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest};
use meshid_common::testing::TestPki;
use meshid_common::tls::{self, PeerMatcher};
use meshid_common::{KeyType, PrivateKey, SpiffeId, TrustBundle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::case;
use crate::client::{Tester, mtls_echo, plain_echo};
use crate::http;
use crate::report::Report;
use crate::spec::SIDECAR_NODE;
use crate::topology::{Mode, Topology};

const SUITE: &str = "badinput";
/// The SDS type URL of a secret.
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// How long a server may take to answer one bad input.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// The CA's serving name.
const CA_NAME: &str = "istiod.istio-system.svc";

/// A change to a CreateCertificate request before it is sent.
type Edit = Box<dyn FnOnce(&mut tonic::Request<IstioCertificateRequest>) + Send>;

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub target: &'static str,
    pub input: String,
    pub expected: String,
    pub observed: String,
    pub ok: bool,
}

/// The rows, and what a refusal must not tell.
struct Table {
    rows: Vec<Row>,
    /// Pod names, node names and UIDs of the mesh.
    facts: Vec<String>,
}

/// A refusal message without its request id (which differs per run).
fn shorten(message: &str) -> String {
    let (text, id) = match message.split_once(" (request id ") {
        Some((text, _)) => (text, " [+ request id]"),
        None => (message, ""),
    };
    let mut short: String = text.chars().take(90).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    format!("{short}{id}").replace('|', "/").replace('\n', " ")
}

/// Random bytes to a port: `Err` (refused) when the server closes, `Ok` (served) otherwise.
async fn garbage_to<S: AsyncRead + AsyncWrite + Unpin>(
    s: std::io::Result<S>,
) -> Result<String, String> {
    let s = s.map_err(|e| format!("connect: {e}"))?;
    poke(s, &garbage()).await
}

impl Table {
    fn push(
        &mut self,
        target: &'static str,
        input: &str,
        expected: &str,
        observed: String,
        ok: bool,
    ) {
        self.rows.push(Row {
            target,
            input: input.to_owned(),
            expected: expected.to_owned(),
            observed,
            ok,
        });
    }

    /// A gRPC refusal with `code` whose message has `needle`. A CA refusal
    /// (`opaque`) must also carry its request id, in the message and in
    /// `x-request-id`, and no pod, node or UID of the mesh.
    fn grpc<T>(
        &mut self,
        target: &'static str,
        input: &str,
        code: Code,
        needle: &str,
        opaque: bool,
        result: Result<T, tonic::Status>,
    ) {
        let expected = format!("{code:?}: {needle}");
        let (observed, ok) = match result {
            Ok(_) => ("accepted".to_owned(), false),
            Err(s) => {
                let message = s.message();
                let mut ok = s.code() == code && message.contains(needle);
                if opaque {
                    let id = s
                        .metadata()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok());
                    ok &= id.is_some_and(|id| message.ends_with(&format!("(request id {id})")));
                    if let Some(fact) = self.facts.iter().find(|f| message.contains(f.as_str())) {
                        return self.push(
                            target,
                            input,
                            &expected,
                            format!("{:?}: {} — tells {fact:?}", s.code(), shorten(message)),
                            false,
                        );
                    }
                }
                (format!("{:?}: {}", s.code(), shorten(message)), ok)
            }
        };
        self.push(target, input, &expected, observed, ok);
    }

    /// A request that must succeed (`what` says what came back).
    fn accepted<E: std::fmt::Display>(
        &mut self,
        target: &'static str,
        input: &str,
        expected: &str,
        result: Result<String, E>,
    ) {
        match result {
            Ok(what) => self.push(target, input, expected, what, true),
            Err(e) => self.push(target, input, expected, format!("failed: {e}"), false),
        }
    }

    /// An HTTP answer with one of `codes`, or (with `closed_ok`) a closed connection.
    fn http(
        &mut self,
        target: &'static str,
        input: &str,
        codes: &[u16],
        closed_ok: bool,
        result: Result<http::Response, crate::Error>,
    ) {
        let mut expected = codes
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" or ");
        if closed_ok {
            expected.push_str(" or closed");
        }
        let (observed, ok) = match result {
            Ok(r) => (format!("{}", r.status), codes.contains(&r.status)),
            Err(e) => (format!("closed ({})", shorten(&e.to_string())), closed_ok),
        };
        self.push(target, input, &expected, observed, ok);
    }

    /// A connection that must not be served: `result` is what the client
    /// saw; `Ok` means it was served.
    fn refused(
        &mut self,
        target: &'static str,
        input: &str,
        expected: &str,
        result: Result<String, String>,
    ) {
        match result {
            Ok(what) => self.push(target, input, expected, format!("served: {what}"), false),
            Err(e) => self.push(target, input, expected, shorten(&e), true),
        }
    }

    fn markdown(&self) -> String {
        let mut out = String::from(
            "| # | target | input | expected | observed | ok |\n|---|---|---|---|---|---|\n",
        );
        for (n, r) in self.rows.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                n + 1,
                r.target,
                r.input.replace('|', "/"),
                r.expected.replace('|', "/"),
                r.observed.replace('|', "/"),
                if r.ok { "yes" } else { "**NO**" }
            );
        }
        out
    }

    /// Fails naming every row of `target` that did not match.
    fn verdict(&self, target: &str) -> Result<(), String> {
        let bad: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.target == target && !r.ok)
            .map(|r| {
                format!(
                    "{}: expected {}, observed {}",
                    r.input, r.expected, r.observed
                )
            })
            .collect();
        let count = self.rows.iter().filter(|r| r.target == target).count();
        if count == 0 {
            return Err(format!("no row for {target}"));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

pub async fn run(mesh: &mut impl Topology, report: &mut Report) {
    let mut t = Table {
        rows: Vec::new(),
        facts: registry_facts(mesh),
    };
    let targets = [
        "ca grpc",
        "ca monitoring",
        "agent sds",
        "agent workload api",
        "agent admin",
        "ztunnel hbone",
        "shim inbound",
    ];
    let mut setup = Vec::new();
    if let Err(e) = ca_rows(mesh, &mut t).await {
        setup.push(format!("ca grpc: {e}"));
    }
    if let Err(e) = monitoring_rows(mesh, &mut t).await {
        setup.push(format!("ca monitoring: {e}"));
    }
    if let Err(e) = sds_rows(mesh, &mut t).await {
        setup.push(format!("agent sds: {e}"));
    }
    if let Err(e) = workload_api_rows(mesh, &mut t).await {
        setup.push(format!("agent workload api: {e}"));
    }
    if let Err(e) = agent_admin_rows(mesh, &mut t).await {
        setup.push(format!("agent admin: {e}"));
    }
    if let Err(e) = hbone_rows(mesh, &mut t).await {
        setup.push(format!("ztunnel hbone: {e}"));
    }
    if let Err(e) = shim_rows(mesh, &mut t).await {
        setup.push(format!("shim inbound: {e}"));
    }
    let table = t.markdown();
    println!(
        "\nbad-input table ({} rows, {} match):\n{table}",
        t.rows.len(),
        t.rows.iter().filter(|r| r.ok).count()
    );
    let path = mesh.state().dir.join("badinput.md");
    if let Err(e) = std::fs::write(&path, &table) {
        eprintln!("e2e: writing {}: {e}", path.display());
    }
    for target in targets {
        let started = std::time::Instant::now();
        let failures: Vec<&String> = setup
            .iter()
            .filter(|s| s.starts_with(&format!("{target}:")))
            .collect();
        let result = if let Some(f) = failures.first() {
            Err(f.to_string())
        } else {
            t.verdict(target)
        };
        crate::suites::record(report, SUITE, &target.replace(' ', "_"), started, result);
    }
    let rows = t.rows.len();
    case!(report, SUITE, "at_least_40_rows", async {
        super::ensure(rows >= 40, || format!("only {rows} rows"))
    });
}

/// Names and UIDs of the mesh's pods and nodes: no CA refusal may tell them.
fn registry_facts(mesh: &impl Topology) -> Vec<String> {
    let mut facts: Vec<String> = vec![
        "uid-".into(),
        SIDECAR_NODE.into(),
        "ghost-0".into(),
        "badinput-0".into(),
    ];
    facts.extend(mesh.ambient().iter().map(|a| format!("ztunnel-{}", a.node)));
    facts.extend(mesh.pods().iter().map(|p| p.name.clone()));
    facts.extend(mesh.ambient().iter().map(|a| a.name.clone()));
    facts.extend(mesh.ambient().iter().map(|a| a.node.clone()));
    facts.sort();
    facts.dedup();
    facts
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A TLS channel to the CA's gRPC port.
fn ca_channel(mesh: &impl Topology) -> Result<Channel, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(mesh.ca_root_pem().map_err(err)?))
        .domain_name(CA_NAME);
    Ok(Endpoint::from_shared(mesh.ca_address())
        .map_err(err)?
        .tls_config(tls)
        .map_err(err)?
        .timeout(ANSWER_WITHIN)
        .connect_lazy())
}

/// A gRPC channel over the Unix socket `path`.
fn uds_channel(path: PathBuf) -> Result<Channel, String> {
    Ok(Endpoint::from_static("http://uds.invalid")
        .timeout(ANSWER_WITHIN)
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })))
}

fn bearer(token: &str) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("Bearer {token}")
        .parse()
        .expect("a minted token is a valid header value")
}

/// Writes `bytes` and reads until the server closes: `Err` (refused) with
/// what came back when it closed, `Ok` (served) when it answered HTTP/1.1
/// 2xx or kept the connection open for `ANSWER_WITHIN`.
async fn poke<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: &[u8]) -> Result<String, String> {
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    let ended = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) => break "closed",
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break "reset",
            Err(_) => break "still open",
        }
    };
    let what = describe(&got);
    if got.starts_with(b"HTTP/1.1 2") || ended == "still open" {
        Ok(format!("{what}, {ended}"))
    } else {
        Err(format!("{what}, {ended}"))
    }
}

/// What a server sent back: a TLS alert, HTTP/2 frames, an HTTP/1.1 status, or bytes.
fn describe(got: &[u8]) -> String {
    match got {
        [] => "nothing".into(),
        [0x15, 0x03, ..] => "TLS alert".into(),
        b if b.starts_with(b"HTTP/1.1 ") => {
            String::from_utf8_lossy(&b[..12.min(b.len())]).into_owned()
        }
        b if b.len() >= 9 && b[3] == 4 => {
            // HTTP/2 frames: SETTINGS first; name a GOAWAY if one follows.
            let goaway = b.windows(4).any(|w| w[0] == 0 && w[3] == 7);
            if goaway {
                "HTTP/2 SETTINGS + GOAWAY".into()
            } else {
                "HTTP/2 SETTINGS".into()
            }
        }
        b => format!("{} bytes", b.len()),
    }
}

/// Random-looking bytes that are no protocol's preface.
fn garbage() -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

// ------------------------------------------------------------------ the CA

async fn ca_rows(mesh: &mut impl Topology, t: &mut Table) -> Result<(), String> {
    const T: &str = "ca grpc";
    let td = mesh.trust_domain().to_owned();
    let token = mesh
        .token_for("e2e", "badinput", "badinput-0")
        .await
        .map_err(err)?;
    let me = SpiffeId::for_service_account(&td, "e2e", "badinput").map_err(err)?;
    let key = PrivateKey::generate(KeyType::EcdsaP256).map_err(err)?;
    let csr = key.csr_for(&me).map_err(err)?;
    let channel = ca_channel(mesh)?;
    let client = || {
        meshid_common::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient::new(
            channel.clone(),
        )
        .max_encoding_message_size(16 << 20)
    };
    let call = |csr: String, ttl: i64, auth: Option<String>, edit: Edit| {
        let mut c = client();
        async move {
            let mut req = tonic::Request::new(IstioCertificateRequest {
                csr,
                validity_duration: ttl,
                metadata: None,
            });
            if let Some(a) = auth {
                req.metadata_mut().insert("authorization", bearer(&a));
            }
            edit(&mut req);
            c.create_certificate(req)
                .await
                .map(|r| r.into_inner().cert_chain.len())
        }
    };
    let none = || -> Edit { Box::new(|_| {}) };
    let claims = || {
        TokenClaims::for_pod(
            "e2e",
            "badinput",
            "badinput-0",
            "uid-e2e-badinput-0",
            SIDECAR_NODE,
            &format!("uid-{SIDECAR_NODE}"),
        )
    };
    let issuer = &mesh.state().issuer;
    let mint = |c: TokenClaims| issuer.mint(&c).map_err(err);
    let now = SystemTime::now();
    let unauth = Code::Unauthenticated;

    t.grpc(
        T,
        "no credential",
        unauth,
        "request authenticate failure: no credential",
        true,
        call(csr.clone(), 600, None, none()).await,
    );
    t.grpc(
        T,
        "authorization: Basic dXNlcjpwdw==",
        unauth,
        "malformed authorization header",
        true,
        call(
            csr.clone(),
            600,
            None,
            Box::new(|r| {
                r.metadata_mut().insert(
                    "authorization",
                    "Basic dXNlcjpwdw==".parse().expect("ascii"),
                );
            }),
        )
        .await,
    );
    t.grpc(
        T,
        "authorization with non-ASCII bytes",
        unauth,
        "malformed authorization header",
        true,
        call(
            csr.clone(),
            600,
            None,
            Box::new(|r| {
                let mut headers = tonic::codegen::http::HeaderMap::new();
                headers.insert(
                    "authorization",
                    tonic::codegen::http::HeaderValue::from_bytes(b"Bearer \xff\xfe\x80")
                        .expect("obs-text is a valid header value"),
                );
                *r.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
            }),
        )
        .await,
    );
    t.grpc(
        T,
        "garbage bearer token",
        unauth,
        "token malformed",
        true,
        call(csr.clone(), 600, Some("not-a-jwt".into()), none()).await,
    );
    let mut c = claims();
    c.issued_at = now - Duration::from_secs(7200);
    c.not_before = Some(c.issued_at);
    c.expires_at = now - Duration::from_secs(3600);
    t.grpc(
        T,
        "expired token",
        unauth,
        "token expired",
        true,
        call(csr.clone(), 600, Some(mint(c)?), none()).await,
    );
    let mut c = claims();
    c.not_before = Some(now + Duration::from_secs(3600));
    c.expires_at = now + Duration::from_secs(7200);
    t.grpc(
        T,
        "token not valid yet (nbf in 1 h)",
        unauth,
        "token not yet valid",
        true,
        call(csr.clone(), 600, Some(mint(c)?), none()).await,
    );
    let mut c = claims();
    c.audiences = vec!["some-other-service".into()];
    t.grpc(
        T,
        "token for another audience",
        unauth,
        "token audience not accepted",
        true,
        call(csr.clone(), 600, Some(mint(c)?), none()).await,
    );
    let mut c = claims();
    c.issuer = Some("https://evil.example".into());
    t.grpc(
        T,
        "token of another issuer",
        unauth,
        "token issuer not accepted",
        true,
        call(csr.clone(), 600, Some(mint(c)?), none()).await,
    );
    let stranger = TokenIssuer::generate(meshid_ca::token::TokenAlgorithm::Es256).map_err(err)?;
    t.grpc(
        T,
        "token signed by an unknown key",
        unauth,
        "token signing key unknown",
        true,
        call(
            csr.clone(),
            600,
            Some(stranger.mint(&claims()).map_err(err)?),
            none(),
        )
        .await,
    );
    let ghost = TokenClaims::for_pod(
        "e2e",
        "badinput",
        "ghost-0",
        "uid-ghost",
        SIDECAR_NODE,
        "uid-x",
    );
    t.grpc(
        T,
        "token of a pod the cluster does not have",
        unauth,
        "token invalidated",
        true,
        call(csr.clone(), 600, Some(mint(ghost)?), none()).await,
    );
    let mut c = claims();
    c.pod = Some(("badinput-0".into(), "uid-of-a-deleted-pod".into()));
    t.grpc(
        T,
        "token of a deleted pod (old uid)",
        unauth,
        "token invalidated",
        true,
        call(csr.clone(), 600, Some(mint(c)?), none()).await,
    );
    t.grpc(
        T,
        "clusterid: cluster-2 (unknown)",
        unauth,
        "cluster id not accepted",
        true,
        call(
            csr.clone(),
            600,
            Some(token.clone()),
            Box::new(|r| {
                r.metadata_mut()
                    .insert("clusterid", "cluster-2".parse().expect("ascii"));
            }),
        )
        .await,
    );

    let invalid = Code::InvalidArgument;
    t.grpc(
        T,
        "CSR \"hello\" (no PEM)",
        invalid,
        "CSR invalid",
        true,
        call("hello".into(), 600, Some(token.clone()), none()).await,
    );
    let other = SpiffeId::for_service_account(&td, "e2e", "someone-else").map_err(err)?;
    t.grpc(
        T,
        "CSR for another workload's identity",
        invalid,
        "CSR identity not allowed",
        true,
        call(
            key.csr_for(&other).map_err(err)?,
            600,
            Some(token.clone()),
            none(),
        )
        .await,
    );
    let foreign = SpiffeId::parse("spiffe://evil.example/ns/e2e/sa/badinput").map_err(err)?;
    t.grpc(
        T,
        "CSR in a foreign trust domain",
        invalid,
        "CSR trust domain not served",
        true,
        call(
            key.csr_for(&foreign).map_err(err)?,
            600,
            Some(token.clone()),
            none(),
        )
        .await,
    );
    t.grpc(
        T,
        "validity_duration 90 d + 1 s",
        invalid,
        "requested TTL above the maximum",
        true,
        call(csr.clone(), 90 * 86_400 + 1, Some(token.clone()), none()).await,
    );
    t.grpc(
        T,
        "validity_duration i64::MAX",
        invalid,
        "requested TTL above the maximum",
        true,
        call(csr.clone(), i64::MAX, Some(token.clone()), none()).await,
    );
    t.accepted(
        T,
        "validity_duration 0",
        "issued (default 24 h)",
        call(csr.clone(), 0, Some(token.clone()), none())
            .await
            .map(|n| format!("issued, {n} PEMs")),
    );
    t.accepted(
        T,
        "validity_duration -5",
        "issued (default 24 h)",
        call(csr.clone(), -5, Some(token.clone()), none())
            .await
            .map(|n| format!("issued, {n} PEMs")),
    );
    t.grpc(
        T,
        "5 MiB request",
        Code::ResourceExhausted,
        "message length too large",
        false,
        call("A".repeat(5 << 20), 600, Some(token.clone()), none()).await,
    );
    let impersonate = |target: prost_types::value::Kind| -> Edit {
        Box::new(move |r| {
            r.get_mut().metadata = Some(prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY_KEY.to_owned(),
                    prost_types::Value { kind: Some(target) },
                )]
                .into(),
            });
        })
    };
    let ambient = mesh.ambient().to_vec();
    let victim = ambient.first().ok_or("the mesh has no ambient workload")?;
    let other_node = ambient
        .iter()
        .map(|a| a.node.clone())
        .find(|n| *n != victim.node)
        .ok_or("the mesh has one node only")?;
    let victim_id = prost_types::value::Kind::StringValue(victim.id.to_string());
    t.grpc(
        T,
        "ImpersonatedIdentity by a workload",
        unauth,
        "not allowed to impersonate",
        true,
        call(
            csr.clone(),
            600,
            Some(token.clone()),
            impersonate(victim_id.clone()),
        )
        .await,
    );
    let zt = crate::cluster::ztunnel_token(&mesh.state().issuer, &other_node).map_err(err)?;
    let victim_csr = key.csr_for(&victim.id).map_err(err)?;
    t.grpc(
        T,
        "ImpersonatedIdentity of a workload on another node",
        unauth,
        "identity not allowed",
        true,
        call(
            victim_csr.clone(),
            600,
            Some(zt.clone()),
            impersonate(victim_id),
        )
        .await,
    );
    t.grpc(
        T,
        "ImpersonatedIdentity that is a number",
        unauth,
        "impersonated identity invalid",
        true,
        call(
            victim_csr,
            600,
            Some(zt),
            impersonate(prost_types::value::Kind::NumberValue(7.0)),
        )
        .await,
    );

    let mut sds_on_ca = SecretDiscoveryServiceClient::new(channel.clone());
    t.grpc(
        T,
        "unknown service (SDS FetchSecrets on the CA)",
        Code::Unimplemented,
        "",
        false,
        sds_on_ca.fetch_secrets(DiscoveryRequest::default()).await,
    );
    let mut jwt = JwtSvidServiceClient::new(channel.clone());
    t.grpc(
        T,
        "JWT-SVID Mint without credential",
        unauth,
        "no credential",
        true,
        jwt.mint(MintJwtSvidRequest {
            audience: vec!["x".into()],
            ..Default::default()
        })
        .await,
    );
    let mut req = tonic::Request::new(MintJwtSvidRequest::default());
    req.metadata_mut().insert("authorization", bearer(&token));
    t.grpc(
        T,
        "JWT-SVID Mint without audience",
        invalid,
        "JWT-SVID request invalid",
        true,
        jwt.mint(req).await,
    );

    let grpc_addr = grpc_socket_addr(mesh)?;
    t.refused(
        T,
        "plaintext HTTP/1.1 to the TLS port",
        "closed, nothing served",
        match TcpStream::connect(grpc_addr).await {
            Ok(s) => poke(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
            Err(e) => Err(format!("connect: {e}")),
        },
    );
    t.refused(
        T,
        "4 KiB of random bytes",
        "closed, nothing served",
        garbage_to(TcpStream::connect(grpc_addr).await).await,
    );
    t.refused(
        T,
        "HTTP/1.1 inside TLS (no h2)",
        "no gRPC service, no 200",
        http1_over_tls(mesh, grpc_addr).await,
    );

    // Still serving.
    t.accepted(
        T,
        "a good CSR after all of the above",
        "issued",
        call(csr, 600, Some(token), none())
            .await
            .map(|n| format!("issued, {n} PEMs")),
    );
    Ok(())
}

/// The CA's gRPC socket address, from `https://host:port`.
fn grpc_socket_addr(mesh: &impl Topology) -> Result<SocketAddr, String> {
    let address = mesh.ca_address();
    address
        .trim_start_matches("https://")
        .parse()
        .map_err(|e| format!("CA address {address}: {e}"))
}

/// TLS with ALPN `http/1.1` and a GET: the CA speaks only HTTP/2.
async fn http1_over_tls(mesh: &impl Topology, addr: SocketAddr) -> Result<String, String> {
    let roots = TrustBundle::from_pem(&mesh.ca_root_pem().map_err(err)?).map_err(err)?;
    let mut store = tokio_rustls::rustls::RootCertStore::empty();
    for root in roots.roots() {
        store.add(root.clone()).map_err(err)?;
    }
    let mut config = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(err)?;
    let name = rustls_pki_types::ServerName::try_from(CA_NAME).map_err(err)?;
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return Err(format!("handshake refused: {e}")),
    };
    poke(tls, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await
}

async fn monitoring_rows(mesh: &mut impl Topology, t: &mut Table) -> Result<(), String> {
    const T: &str = "ca monitoring";
    let addr = mesh.state().ca_monitoring;
    let get = async |path: String| http::get(addr, &path, ANSWER_WITHIN).await;
    t.http(T, "GET /nope", &[404], false, get("/nope".into()).await);
    t.http(
        T,
        "POST /ready",
        &[405],
        false,
        http::request(addr, "POST", "/ready", "x", ANSWER_WITHIN).await,
    );
    t.http(
        T,
        "DELETE /metrics",
        &[405],
        false,
        http::request(addr, "DELETE", "/metrics", "", ANSWER_WITHIN).await,
    );
    t.http(
        T,
        "GET /ready?x=%ff&&y (query ignored)",
        &[200],
        false,
        get("/ready?x=%ff&&y".into()).await,
    );
    t.http(
        T,
        "GET /../../etc/passwd",
        &[404],
        false,
        get("/../../etc/passwd".into()).await,
    );
    t.http(
        T,
        "GET /%2e%2e/%00",
        &[404, 400],
        false,
        get("/%2e%2e/%00".into()).await,
    );
    t.http(
        T,
        "GET with a 1 MiB path",
        &[400, 414, 431],
        true,
        get(format!("/{}", "a".repeat(1 << 20))).await,
    );
    t.refused(
        T,
        "4 KiB of random bytes",
        "400 or closed",
        garbage_to(TcpStream::connect(addr).await).await,
    );
    t.http(
        T,
        "GET /metrics after all of the above",
        &[200],
        false,
        get("/metrics".into()).await,
    );
    Ok(())
}

// ------------------------------------------------------------------ the agent

/// The socket directory of the first shim pod.
fn strict_shim_pod(mesh: &impl Topology) -> Result<crate::topology::Pod, String> {
    mesh.pods()
        .iter()
        .find(|p| p.proxy == crate::topology::Proxy::Shim && p.mode == Mode::Strict)
        .cloned()
        .ok_or_else(|| "the mesh has no STRICT shim pod".into())
}

/// The STRICT shim pod and its agent's socket directory.
fn pod_uds_dir(mesh: &impl Topology) -> Result<(crate::topology::Pod, PathBuf), String> {
    let pod = strict_shim_pod(mesh)?;
    let dir = mesh.pod_uds_dir(&pod.name).map_err(err)?;
    Ok((pod, dir))
}

fn sds_request(names: &[&str], node: bool) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node.then(|| Node {
            id: "sidecar~127.0.0.1~badinput.e2e~e2e.svc.cluster.local".into(),
            cluster: "badinput".into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    }
}

/// Opens a StreamSecrets with `first` and returns the first answer (or the
/// refusal); `None` when nothing came within `quiet` and the stream is open.
async fn sds_open(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    first: DiscoveryRequest,
    quiet: Duration,
) -> Result<Option<String>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.expect("open channel");
    let mut stream = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let Ok(msg) = tokio::time::timeout(quiet, stream.message()).await else {
        return Ok(None);
    };
    let msg = msg?.ok_or_else(|| tonic::Status::unknown("the stream ended"))?;
    drop(tx);
    let names: Vec<String> = msg
        .resources
        .iter()
        .map(|r| {
            use prost::Message as _;
            meshid_common::proto::tls::Secret::decode(r.value.as_slice())
                .map(|s| s.name)
                .unwrap_or_else(|_| "<undecodable>".into())
        })
        .collect();
    Ok(Some(format!("secret(s) {names:?}")))
}

/// The first answer of a stream, which must come.
async fn sds_first(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    first: DiscoveryRequest,
) -> Result<String, tonic::Status> {
    sds_open(client, first, ANSWER_WITHIN)
        .await?
        .ok_or_else(|| tonic::Status::deadline_exceeded("no answer"))
}

async fn sds_rows(mesh: &mut impl Topology, t: &mut Table) -> Result<(), String> {
    const T: &str = "agent sds";
    let (_, dir) = pod_uds_dir(mesh)?;
    let socket = dir.join("socket");
    let mut sds = SecretDiscoveryServiceClient::new(uds_channel(socket.clone())?)
        .max_encoding_message_size(16 << 20);
    let invalid = Code::InvalidArgument;
    t.grpc(
        T,
        "first request without node.id",
        invalid,
        "node.id",
        false,
        sds_first(&mut sds, sds_request(&["default"], false)).await,
    );
    t.accepted(
        T,
        "resource name \"nope\"",
        "the workload secret named \"nope\" (as pilot-agent)",
        sds_first(&mut sds, sds_request(&["nope"], true))
            .await
            .and_then(|got| {
                if got.contains("\"nope\"") {
                    Ok(got)
                } else {
                    Err(tonic::Status::unknown(got))
                }
            }),
    );
    t.accepted(
        T,
        "resource name \"file-root:/etc/shadow\" (not allowed)",
        "nothing pushed; stream kept",
        match sds_open(
            &mut sds,
            sds_request(&["file-root:/etc/shadow"], true),
            Duration::from_millis(700),
        )
        .await
        {
            Ok(None) => Ok("nothing pushed; stream open".to_owned()),
            Ok(Some(got)) => Err(format!("pushed {got}")),
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        },
    );
    let mut wrong_type = sds_request(&["default"], true);
    wrong_type.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    t.grpc(
        T,
        "type_url of a Cluster",
        invalid,
        "type_url",
        false,
        sds_first(&mut sds, wrong_type).await,
    );
    let huge = "x".repeat(5 << 20);
    t.grpc(
        T,
        "5 MiB resource name",
        Code::ResourceExhausted,
        "message length too large",
        false,
        sds_first(&mut sds, sds_request(&[huge.as_str()], true)).await,
    );
    let mut wrong_service = SpiffeWorkloadApiClient::new(uds_channel(socket.clone())?);
    t.grpc(
        T,
        "unknown service (Workload API on the SDS socket)",
        Code::Unimplemented,
        "",
        false,
        wrong_service
            .fetch_jwt_bundles(with_header(
                Some("true"),
                meshid_common::proto::workload::JwtBundlesRequest {},
            ))
            .await,
    );
    // A NACK: no reply, the stream stays, a later request is answered.
    t.accepted(
        T,
        "NACK (error_detail) after the first push",
        "no reply; stream kept",
        sds_nack(&mut sds).await,
    );
    t.refused(
        T,
        "4 KiB of random bytes on the socket",
        "closed, nothing served",
        garbage_to(UnixStream::connect(&socket).await).await,
    );
    t.accepted(
        T,
        "\"default\" after all of the above",
        "the workload secret",
        sds_first(&mut sds, sds_request(&["default"], true)).await,
    );
    Ok(())
}

/// Subscribes to `ROOTCA`, NACKs the push, expects silence, then asks for
/// `default` on the same stream and expects it.
async fn sds_nack(sds: &mut SecretDiscoveryServiceClient<Channel>) -> Result<String, String> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(sds_request(&["ROOTCA"], true)).await.map_err(err)?;
    let mut stream = sds
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(err)?
        .into_inner();
    let first = tokio::time::timeout(ANSWER_WITHIN, stream.message())
        .await
        .map_err(|_| "no first push")?
        .map_err(err)?
        .ok_or("the stream ended")?;
    let mut nack = sds_request(&["ROOTCA"], false);
    nack.response_nonce = first.nonce.clone();
    nack.version_info = String::new();
    nack.error_detail = Some(meshid_common::proto::google::rpc::Status {
        code: Code::InvalidArgument as i32,
        message: "badinput: rejected on purpose".into(),
        details: Vec::new(),
    });
    tx.send(nack).await.map_err(err)?;
    if let Ok(reply) = tokio::time::timeout(Duration::from_millis(700), stream.message()).await {
        return Err(format!("answered the NACK: {reply:?}"));
    }
    Ok("no reply to the NACK; stream open".into())
}

/// A Workload API request with `workload.spiffe.io: <value>` (none for `None`).
fn with_header<T>(value: Option<&'static str>, req: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    if let Some(v) = value {
        r.metadata_mut()
            .insert("workload.spiffe.io", v.parse().expect("ascii"));
    }
    r
}

async fn workload_api_rows(mesh: &mut impl Topology, t: &mut Table) -> Result<(), String> {
    const T: &str = "agent workload api";
    let (pod, dir) = pod_uds_dir(mesh)?;
    let mut api = SpiffeWorkloadApiClient::new(uds_channel(dir.join("workload.sock"))?);
    let invalid = Code::InvalidArgument;
    t.grpc(
        T,
        "FetchX509SVID without workload.spiffe.io",
        invalid,
        "workload.spiffe.io",
        false,
        api.fetch_x509svid(with_header(None, X509svidRequest {}))
            .await,
    );
    t.grpc(
        T,
        "FetchX509SVID with workload.spiffe.io: false",
        invalid,
        "workload.spiffe.io",
        false,
        api.fetch_x509svid(with_header(Some("false"), X509svidRequest {}))
            .await,
    );
    t.grpc(
        T,
        "FetchJWTSVID without audience",
        invalid,
        "audience",
        false,
        api.fetch_jwtsvid(with_header(Some("true"), JwtsvidRequest::default()))
            .await,
    );
    let other = SpiffeId::for_service_account(mesh.trust_domain(), "default", "someone-else")
        .map_err(err)?;
    t.grpc(
        T,
        "FetchJWTSVID for another workload's spiffe_id",
        Code::PermissionDenied,
        "",
        false,
        api.fetch_jwtsvid(with_header(
            Some("true"),
            JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: other.to_string(),
            },
        ))
        .await,
    );
    t.grpc(
        T,
        "ValidateJWTSVID of \"a.b.c\"",
        invalid,
        "",
        false,
        api.validate_jwtsvid(with_header(
            Some("true"),
            ValidateJwtsvidRequest {
                audience: "x".into(),
                svid: "a.b.c".into(),
            },
        ))
        .await,
    );
    t.grpc(
        T,
        "ValidateJWTSVID without svid",
        invalid,
        "svid",
        false,
        api.validate_jwtsvid(with_header(
            Some("true"),
            ValidateJwtsvidRequest {
                audience: "x".into(),
                svid: String::new(),
            },
        ))
        .await,
    );
    let good = async {
        let mut stream = api
            .fetch_x509svid(with_header(Some("true"), X509svidRequest {}))
            .await
            .map_err(err)?
            .into_inner();
        let msg = tokio::time::timeout(ANSWER_WITHIN, stream.message())
            .await
            .map_err(|_| "no SVID".to_owned())?
            .map_err(err)?
            .ok_or("the stream ended")?;
        let id = msg
            .svids
            .first()
            .map(|s| s.spiffe_id.clone())
            .unwrap_or_default();
        if id == pod.id.as_str() {
            Ok(format!("SVID {id}"))
        } else {
            Err(format!("SVID {id:?}"))
        }
    };
    t.accepted(
        T,
        "FetchX509SVID after all of the above",
        "the pod's SVID",
        good.await,
    );
    Ok(())
}

async fn agent_admin_rows(mesh: &mut impl Topology, t: &mut Table) -> Result<(), String> {
    const T: &str = "agent admin";
    let pod = strict_shim_pod(mesh)?;
    let agent = pod.agent.clone();
    t.http(
        T,
        "GET /debug/../../etc/passwd",
        &[404],
        false,
        mesh.admin_get(&agent, "/debug/../../etc/passwd").await,
    );
    t.http(
        T,
        "GET /debug/certs?x=%00",
        &[200],
        false,
        mesh.admin_get(&agent, "/debug/certs?x=%00").await,
    );
    t.http(
        T,
        "GET /ready after all of the above",
        &[200],
        false,
        mesh.admin_get(&agent, "/ready").await,
    );
    Ok(())
}

// ------------------------------------------------------------------ HBONE

/// An HBONE connection as `client` to `addr`, opened for `server` (SNI).
async fn hbone(
    client: &Tester,
    server: &SpiffeId,
    addr: SocketAddr,
) -> Result<h2::client::SendRequest<&'static [u8]>, String> {
    let (_tx, rx) = tokio::sync::watch::channel(Some(client.creds.clone()));
    let mut config = tls::client_config(rx, PeerMatcher::Exact(server.clone())).map_err(err)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(err)?;
    let tls = tokio::time::timeout(
        ANSWER_WITHIN,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(tls::sni_for(server), tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| format!("handshake refused: {e}"))?;
    let (send, conn) = h2::client::Builder::new()
        .handshake::<_, &'static [u8]>(tls)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Sends one request; the status, or how the stream failed.
async fn status_of(
    send: &mut h2::client::SendRequest<&'static [u8]>,
    request: tonic::codegen::http::Request<()>,
) -> Result<u16, String> {
    let run = async {
        let mut ready = send.clone().ready().await.map_err(|e| format!("{e}"))?;
        let (response, _stream) = ready
            .send_request(request, false)
            .map_err(|e| format!("{e}"))?;
        let response = response.await.map_err(|e| format!("{e}"))?;
        Ok(response.status().as_u16())
    };
    tokio::time::timeout(ANSWER_WITHIN, run)
        .await
        .unwrap_or_else(|_| Err("no answer".into()))
}

fn connect_to(authority: &str) -> tonic::codegen::http::Request<()> {
    tonic::codegen::http::Request::builder()
        .method(tonic::codegen::http::Method::CONNECT)
        .uri(authority)
        .body(())
        .expect("a CONNECT request")
}

async fn hbone_rows(mesh: &mut impl Topology, t: &mut Table) -> Result<(), String> {
    const T: &str = "ztunnel hbone";
    let ambient = mesh.ambient().to_vec();
    let node = ambient.first().ok_or("no ambient workload")?.node.clone();
    let addr = *mesh
        .state()
        .hbone
        .iter()
        .find(|(n, _)| *n == node)
        .map(|(_, a)| a)
        .ok_or_else(|| {
            mesh.unsupported_because(
                "HBONE",
                &format!("{node}'s ztunnel"),
                "the backend does not tell its HBONE address (nor the workloads' pod addresses \
                 CONNECT names)",
            )
            .to_string()
        })?;
    let here: Vec<_> = ambient.iter().filter(|a| a.node == node).cloned().collect();
    let [dst, neighbour] = [&here[0], here.get(1).ok_or("one workload on the node")?];
    let tester = Tester::from_ca(
        mesh,
        "badinput-hbone",
        "badinput-hbone-0",
        Duration::from_secs(600),
    )
    .await?;

    let mut h = hbone(&tester, &dst.id, addr).await?;
    let get = tonic::codegen::http::Request::builder()
        .method("GET")
        .uri(format!("https://{}/", dst.app))
        .body(())
        .map_err(err)?;
    let status = |r: Result<u16, String>| {
        r.map(|s| s.to_string())
            .unwrap_or_else(|e| format!("reset ({})", shorten(&e)))
    };
    let row = |t: &mut Table, input: &str, want: &[u16], reset_ok: bool, r: Result<u16, String>| {
        let ok = match &r {
            Ok(s) => want.contains(s),
            Err(_) => reset_ok,
        };
        let mut expected = want
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" or ");
        if reset_ok {
            expected.push_str(" or stream reset");
        }
        t.push(T, input, &expected, status(r), ok);
    };
    row(
        t,
        "GET instead of CONNECT",
        &[400],
        false,
        status_of(&mut h, get).await,
    );
    row(
        t,
        "CONNECT backend.example:80 (not ip:port)",
        &[400],
        false,
        status_of(&mut h, connect_to("backend.example:80")).await,
    );
    row(
        t,
        "CONNECT 127.10.99.99:80 (no such workload)",
        &[404],
        false,
        status_of(&mut h, connect_to("127.10.99.99:80")).await,
    );
    row(
        t,
        "CONNECT to a neighbour on a connection for another identity",
        &[401],
        false,
        status_of(&mut h, connect_to(&neighbour.app.to_string())).await,
    );
    let mut big = connect_to(&dst.app.to_string());
    big.headers_mut()
        .insert("x-padding", "p".repeat(1 << 20).parse().map_err(err)?);
    let mut h2 = hbone(&tester, &dst.id, addr).await?;
    row(
        t,
        "CONNECT with a 1 MiB header",
        &[431],
        true,
        status_of(&mut h2, big).await,
    );

    // Handshakes the server must refuse.
    let evil = TestPki::new(mesh.trust_domain()).map_err(err)?;
    let evil_id = evil.id("default", "frontend");
    let svid = evil
        .custom_svid(
            &LeafSpec::svid(&evil_id, Duration::from_secs(600)),
            SystemTime::now(),
        )
        .map_err(err)?;
    let real = TrustBundle::from_pem(&mesh.ca_root_pem().map_err(err)?).map_err(err)?;
    let foreign = Tester::from_parts(svid, real.clone());
    let handshake = |r: Result<h2::client::SendRequest<&'static [u8]>, String>| async move {
        match r {
            Err(e) => Err(e),
            Ok(mut s) => match status_of(&mut s, connect_to("127.0.0.1:1")).await {
                Ok(code) => Ok(format!("HTTP/2 answered {code}")),
                Err(e) => Err(format!("stream refused: {e}")),
            },
        }
    };
    t.refused(
        T,
        "client certificate from a foreign root",
        "handshake refused",
        handshake(hbone(&foreign, &dst.id, addr).await).await,
    );
    t.refused(
        T,
        "no client certificate",
        "handshake refused",
        no_client_cert(&real, &dst.id, addr).await,
    );
    t.refused(
        T,
        "4 KiB of random bytes",
        "closed, nothing served",
        garbage_to(TcpStream::connect(addr).await).await,
    );
    let mut fresh = hbone(&tester, &dst.id, addr).await?;
    row(
        t,
        "CONNECT to the workload after all of the above",
        &[200],
        false,
        status_of(&mut fresh, connect_to(&dst.app.to_string())).await,
    );
    Ok(())
}

/// A TLS client with the right roots and no certificate.
async fn no_client_cert(
    roots: &TrustBundle,
    server: &SpiffeId,
    addr: SocketAddr,
) -> Result<String, String> {
    let mut store = tokio_rustls::rustls::RootCertStore::empty();
    for root in roots.roots() {
        store.add(root.clone()).map_err(err)?;
    }
    // The server's name is its SPIFFE ID, not a DNS name: accept any server
    // certificate, only the client side is under test.
    let mut config = tokio_rustls::rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(err)?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(tls::sni_for(server), tcp)
        .await
        .map_err(|e| format!("handshake refused: {e}"))?;
    // TLS 1.3: the server's verdict on the client arrives after the client's Finished.
    let mut buf = [0u8; 64];
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    match tokio::time::timeout(ANSWER_WITHIN, tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(n)) => Ok(format!("{n} bytes")),
        Ok(Err(e)) => Err(format!("handshake refused: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

#[derive(Debug)]
struct AnyServer;

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::client::danger::ServerCertVerified, tokio_rustls::rustls::Error>
    {
        Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        Ok(tokio_rustls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        Ok(tokio_rustls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ------------------------------------------------------------------ the shim

async fn shim_rows(mesh: &mut impl Topology, t: &mut Table) -> Result<(), String> {
    const T: &str = "shim inbound";
    let pod = strict_shim_pod(mesh)?;
    t.refused(
        T,
        "plaintext to STRICT",
        "refused",
        plain_echo(pod.inbound, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .map(|_| "echoed".into()),
    );
    let evil = TestPki::new(mesh.trust_domain()).map_err(err)?;
    let evil_id = evil.id("e2e", "tester");
    let svid = evil
        .custom_svid(
            &LeafSpec::svid(&evil_id, Duration::from_secs(600)),
            SystemTime::now(),
        )
        .map_err(err)?;
    let real = TrustBundle::from_pem(&mesh.ca_root_pem().map_err(err)?).map_err(err)?;
    t.refused(
        T,
        "client certificate from a foreign root (same trust domain name)",
        "refused",
        mtls_echo(
            pod.inbound,
            &Tester::from_parts(svid, real.clone()),
            &pod.id,
            b"let me in\n",
        )
        .await
        .map(|_| "echoed".into()),
    );
    t.refused(
        T,
        "no client certificate",
        "refused",
        no_client_cert(&real, &pod.id, pod.inbound).await,
    );
    let tester = Tester::from_ca(
        mesh,
        "badinput-shim",
        "badinput-shim-0",
        Duration::from_secs(600),
    )
    .await?;
    let wrong = SpiffeId::for_service_account(mesh.trust_domain(), "default", "not-the-pod")
        .map_err(err)?;
    t.refused(
        T,
        "mesh client expecting another server SAN",
        "the client refuses (secure naming)",
        mtls_echo(pod.inbound, &tester, &wrong, b"hello\n")
            .await
            .map(|_| "echoed".into()),
    );
    t.refused(
        T,
        "4 KiB of random bytes",
        "closed, nothing served",
        garbage_to(TcpStream::connect(pod.inbound).await).await,
    );
    t.accepted(
        T,
        "mesh client after all of the above",
        "echoed",
        mtls_echo(pod.inbound, &tester, &pod.id, b"still here\n")
            .await
            .map(|_| "echoed".to_owned()),
    );
    Ok(())
}

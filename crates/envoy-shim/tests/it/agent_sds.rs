//! The SDS server of the shim's tests and benchmarks: the real meshid-agent,
//! its CSRs signed in-process by the shared test CA (`identity::fake`) over a
//! [`TestPki`], answering as the Istio CA does (leaf, intermediate, root
//! bundle last). This file is the one place that
//! knows how a certificate source is plugged into the agent; the benches
//! include it with `#[path]`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshid_agent::app::Parts;
use meshid_agent::{App as Agent, Clock, Config as AgentConfig};
use meshid_common::identity::fake::TestCa;
use meshid_common::testing::TestPki;
use meshid_common::{Credentials, CredentialsRx};

/// How long the agent may take to get a certificate from the test CA.
const AGENT_WAIT: Duration = Duration::from_secs(10);

/// A running agent serving `default` and `ROOTCA` on its SDS socket.
pub struct AgentSds {
    agent: Agent,
    _dir: tempfile::TempDir,
}

impl AgentSds {
    /// An agent for workload `ns/sa` of `pki`'s trust domain, its SDS socket
    /// at `socket` (its other files in a temp dir). Returns once it holds
    /// a certificate.
    pub async fn start(pki: &Arc<TestPki>, ns: &str, sa: &str, socket: &Path) -> AgentSds {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(dir.path().join("token"), "test.jwt.token").expect("token file");
        let args = [
            "meshid-agent".to_owned(),
            "--sds-socket".into(),
            socket.display().to_string(),
            "--spiffe-endpoint-socket".into(),
            format!("unix://{}", p("api.sock")),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--token-path".into(),
            p("token"),
            "--ca-root-ca".into(),
            p("ca-root.pem"),
            "--trust-domain".into(),
            pki.trust_domain.clone(),
            "--namespace".into(),
            ns.into(),
            "--service-account".into(),
            sa.into(),
        ];
        let config =
            AgentConfig::from_args(args, &HashMap::<String, String>::new()).expect("agent config");
        let agent = Agent::build_with(
            config,
            Parts {
                source: TestCa::new(pki.clone(), Clock::System),
                clock: Clock::System,
            },
        )
        .await
        .expect("the agent starts");
        let sds = AgentSds { agent, _dir: dir };
        sds.current().await;
        sds
    }

    pub fn socket(&self) -> &Path {
        self.agent.sds_socket()
    }

    /// The agent's credentials as they change.
    pub fn credentials(&self) -> CredentialsRx {
        self.agent.credentials()
    }

    /// The credentials served now (waiting for the first).
    pub async fn current(&self) -> Credentials {
        let mut rx = self.agent.credentials();
        self.agent.manager().request(None);
        let c = tokio::time::timeout(AGENT_WAIT, rx.wait_for(Option::is_some))
            .await
            .expect("the agent gets a certificate")
            .expect("the agent is running");
        c.clone().expect("checked")
    }

    /// Makes the agent renew now; returns the new leaf serial.
    pub async fn rotate(&self) -> String {
        let old = self.current().await.svid.leaf().serial.clone();
        let mut rx = self.agent.credentials();
        self.agent.manager().refresh_now();
        let c = tokio::time::timeout(
            AGENT_WAIT,
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.svid.leaf().serial != old)),
        )
        .await
        .expect("the agent renews")
        .expect("the agent is running");
        c.as_ref().expect("checked").svid.leaf().serial.clone()
    }

    pub async fn shutdown(self) {
        self.agent.shutdown().await;
    }
}

//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it: every retry period each replica reads the Lease;
//! the holder renews it (`renewTime`), another replica takes it over only
//! once it has seen the same record unchanged for a whole lease duration
//! (time measured on its own clock, never by comparing the holder's
//! timestamps with its own), and writes are guarded by `resourceVersion`, so
//! of two replicas racing for it one gets `409 Conflict` and stays a
//! follower. A leader that cannot renew for the renew deadline (shorter than
//! the lease duration) steps down on its own, so it has stopped acting
//! before anyone else may take over. On shutdown the holder releases the
//! Lease (empty holder, duration 1 s) so a successor need not wait.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use meshid_common::kube::sleep;

/// client-go's defaults.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Which Lease, who we are, and the timings.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    /// This replica's name in `holderIdentity`.
    pub holder: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Election {
    /// With client-go's default timings.
    pub fn new(namespace: &str, lease: &str, holder: &str) -> Self {
        Election {
            namespace: namespace.to_owned(),
            lease: lease.to_owned(),
            holder: holder.to_owned(),
            lease_duration: LEASE_DURATION,
            renew_deadline: RENEW_DEADLINE,
            retry_period: RETRY_PERIOD,
        }
    }

    /// The election, to be run (spawned) until `cancel`, when it releases a
    /// held Lease; the receiver says whether this replica leads now.
    pub fn start(
        self,
        client: kube::Client,
        cancel: CancellationToken,
    ) -> (
        watch::Receiver<bool>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (tx, rx) = watch::channel(false);
        (rx, self.run(client, tx, cancel))
    }

    async fn run(self, client: kube::Client, tx: watch::Sender<bool>, cancel: CancellationToken) {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        let mut observed: Option<(Record, Instant)> = None;
        let mut last_renewal = Instant::now();
        loop {
            let leading = *tx.borrow();
            let attempt = tokio::select! {
                _ = cancel.cancelled() => break,
                a = tokio::time::timeout(self.retry_period.max(Duration::from_millis(100)) * 2,
                                         self.try_acquire_or_renew(&api, &mut observed)) => a,
            };
            match attempt {
                Ok(Ok(true)) => {
                    last_renewal = Instant::now();
                    if !leading {
                        tracing::info!(lease = %self.lease, holder = %self.holder, "leader election: acquired the lease");
                        tx.send_replace(true);
                    }
                }
                Ok(Ok(false)) => {
                    if leading {
                        tracing::warn!(lease = %self.lease, "leader election: another replica holds the lease; stepping down");
                        tx.send_replace(false);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.lease, error = %e, "leader election: the lease could not be read or written");
                }
                Err(_) => {
                    tracing::warn!(lease = %self.lease, "leader election: the API server did not answer in time");
                }
            }
            if *tx.borrow() && last_renewal.elapsed() >= self.renew_deadline {
                tracing::warn!(lease = %self.lease, deadline_ms = self.renew_deadline.as_millis() as u64,
                    "leader election: no renewal within the renew deadline; stepping down");
                tx.send_replace(false);
            }
            if !sleep(self.retry_period, &cancel).await {
                break;
            }
        }
        if *tx.borrow() {
            tx.send_replace(false);
            self.release(&api).await;
        }
    }

    fn spec(&self, now: MicroTime, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            // Whole seconds on the wire: rounded up, never shorter than ours.
            lease_duration_seconds: Some(self.lease_duration.as_secs_f64().ceil().max(1.0) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: true if this replica holds the lease afterwards.
    async fn try_acquire_or_renew(
        &self,
        api: &Api<Lease>,
        observed: &mut Option<(Record, Instant)>,
    ) -> Result<bool, String> {
        let now = now();
        let lease = api
            .get_opt(&self.lease)
            .await
            .map_err(|e| format!("reading Lease {}/{}: {e}", self.namespace, self.lease))?;
        let Some(mut lease) = lease else {
            let new = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match api.create(&PostParams::default(), &new).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(format!(
                    "creating Lease {}/{}: {e}",
                    self.namespace, self.lease
                )),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = Record {
            holder: holder.clone(),
            renew: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            version: lease.metadata.resource_version.clone(),
        };
        let seen_at = match observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                *observed = Some((record, Instant::now()));
                Instant::now()
            }
        };
        let duration = spec
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.lease_duration);
        let mine = holder == self.holder;
        let expired = holder.is_empty() || seen_at.elapsed() >= duration;
        if !mine && !expired {
            return Ok(false);
        }
        let (acquired, transitions) = if mine {
            (
                spec.acquire_time.clone(),
                spec.lease_transitions.unwrap_or(0),
            )
        } else {
            (None, spec.lease_transitions.unwrap_or(0) + 1)
        };
        lease.spec = Some(self.spec(now, acquired, transitions));
        match api
            .replace(&self.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote it first: read again next round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(format!(
                "updating Lease {}/{}: {e}",
                self.namespace, self.lease
            )),
        }
    }

    /// Gives the lease up, if this replica still holds it.
    async fn release(&self, api: &Api<Lease>) {
        let Ok(Some(mut lease)) = api.get_opt(&self.lease).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        match api
            .replace(&self.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.lease, "leader election: lease released"),
            Err(e) => {
                tracing::warn!(lease = %self.lease, error = %e, "leader election: the lease could not be released")
            }
        }
    }
}

/// The current time as the API writes it (microseconds).
fn now() -> MicroTime {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    MicroTime(k8s_openapi::jiff::Timestamp::from_microsecond(micros).unwrap_or_default())
}

/// What a replica last saw of the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: String,
    renew: Option<String>,
    version: Option<String>,
}

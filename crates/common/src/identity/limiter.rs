//! A fetch limiter for node agents that hold many identities: at most N
//! certificate requests in flight, and a request that a connection is
//! waiting for goes before the background renewals (so a CSR storm when a
//! node fills up queues instead of hammering the CA).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

/// A slot to run one fetch; handed to the next waiter when dropped.
pub struct Permit {
    limiter: Option<Arc<FetchLimiter>>,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take() {
            l.release();
        }
    }
}

#[derive(Default)]
struct LimiterState {
    free: usize,
    urgent: VecDeque<oneshot::Sender<Permit>>,
    normal: VecDeque<oneshot::Sender<Permit>>,
}

/// A counting semaphore with two queues: waiters marked urgent are served
/// before the others, in arrival order within each queue.
pub struct FetchLimiter {
    state: Mutex<LimiterState>,
}

impl fmt::Debug for FetchLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.lock().expect("limiter lock");
        f.debug_struct("FetchLimiter")
            .field("free", &st.free)
            .field("urgent", &st.urgent.len())
            .field("normal", &st.normal.len())
            .finish()
    }
}

impl FetchLimiter {
    pub fn new(permits: usize) -> Arc<Self> {
        Arc::new(FetchLimiter {
            state: Mutex::new(LimiterState {
                free: permits,
                ..Default::default()
            }),
        })
    }

    fn enqueue(
        self: &Arc<Self>,
        urgent: bool,
    ) -> std::result::Result<Permit, oneshot::Receiver<Permit>> {
        let mut st = self.state.lock().expect("limiter lock");
        if st.free > 0 {
            st.free -= 1;
            return Ok(Permit {
                limiter: Some(self.clone()),
            });
        }
        let (tx, rx) = oneshot::channel();
        if urgent {
            st.urgent.push_back(tx);
        } else {
            st.normal.push_back(tx);
        }
        Err(rx)
    }

    /// Waits for a permit. When `upgrade`'s notify fires and its predicate
    /// holds (a stale notification is ignored), a waiter that was not urgent
    /// moves to the urgent queue.
    pub async fn acquire(
        self: &Arc<Self>,
        mut urgent: bool,
        upgrade: Option<(&Notify, &(dyn Fn() -> bool + Sync))>,
    ) -> Permit {
        let mut rx = match self.enqueue(urgent) {
            Ok(p) => return p,
            Err(rx) => rx,
        };
        loop {
            let upgraded = async {
                match upgrade {
                    Some((n, still_urgent)) if !urgent => loop {
                        n.notified().await;
                        if still_urgent() {
                            break;
                        }
                    },
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                got = &mut rx => match got {
                    Ok(p) => return p,
                    // The limiter dropped our sender without a permit: ask again.
                    Err(_) => match self.enqueue(urgent) {
                        Ok(p) => return p,
                        Err(r) => rx = r,
                    },
                },
                _ = upgraded => {
                    urgent = true;
                    let old = std::mem::replace(&mut rx, match self.enqueue(true) {
                        Ok(p) => return p,
                        Err(r) => r,
                    });
                    // A permit already sent to the old place is released by this drop.
                    drop(old);
                }
            }
        }
    }

    fn release(self: Arc<Self>) {
        let mut st = self.state.lock().expect("limiter lock");
        loop {
            let next = match st.urgent.pop_front() {
                Some(tx) => Some(tx),
                None => st.normal.pop_front(),
            };
            let Some(tx) = next else {
                st.free += 1;
                return;
            };
            let permit = Permit {
                limiter: Some(self.clone()),
            };
            match tx.send(permit) {
                Ok(()) => return,
                // That waiter left; disarm the permit and try the next one.
                Err(mut p) => p.limiter = None,
            }
        }
    }

    /// Free permits now (tests).
    pub fn available(&self) -> usize {
        self.state.lock().expect("limiter lock").free
    }
}

//! How every meshid process serves and stops: one accept loop ([`Drain::serve`])
//! for TCP and Unix listeners, one shutdown shape ([`Drain`]), and one admin
//! HTTP router ([`AdminRouter`]) that each component mounts its pages on.
//!
//! A component owns one [`Drain`]. Listeners, connections and background
//! tasks all run on it; [`Drain::drain`] is its whole shutdown:
//!
//! 1. **stopping**: accept loops return (their listeners close, a new
//!    connect is refused), background loops end, connections are told to
//!    finish (HTTP/2 GOAWAY, HTTP/1 no keep-alive);
//! 2. up to `grace`, open connections run on;
//! 3. **aborting**: the grace is over; handlers that watch
//!    [`Drain::aborting`] cut their connections and log why;
//! 4. after [`ABORT_WAIT`] more, whatever still runs is dropped.

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How long handlers that watch [`Drain::aborting`] get to wind down after
/// the grace period, before their tasks are dropped.
pub const ABORT_WAIT: Duration = Duration::from_secs(1);

/// First pause after a failed `accept` (out of descriptors, …); doubles up
/// to [`ACCEPT_BACKOFF_MAX`] while accepting keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Something connections are accepted from.
pub trait Listener: Send + Sync + 'static {
    type Io: Send + 'static;
    type Addr: Debug + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        TcpListener::accept(self)
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        UnixListener::accept(self)
    }
}

/// A component's lifetime: what it runs, and how it stops (see the module
/// docs). Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    stopping: CancellationToken,
    aborting: CancellationToken,
    killed: CancellationToken,
    tasks: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when shutdown starts: stop accepting, finish up.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// Cancelled when the grace period is over: cut open connections now.
    pub fn aborting(&self) -> &CancellationToken {
        &self.aborting
    }

    /// Tasks (connections and background loops) still running.
    pub fn open(&self) -> usize {
        self.tasks.len()
    }

    /// Runs `task` until it ends or the drain drops it.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(until_killed(task, self.killed.clone()));
    }

    /// Accepts on `listener` until [`Drain::stopping`], running
    /// `handle(io, peer)` for each connection as a task of this drain.
    pub fn serve<L, H, F>(&self, what: &'static str, listener: L, handle: H)
    where
        L: Listener,
        H: Fn(L::Io, L::Addr) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        self.spawn(async move {
            let stop = this.stopping.clone();
            accept_loop(what, &listener, &stop, |io, peer| {
                this.spawn(handle(io, peer))
            })
            .await
        });
    }

    /// Accepted connections as a stream (for tonic's `serve_with_incoming`):
    /// each is first passed through `prepare` (a TLS handshake, a peer
    /// check) in its own task; those answering `None` are dropped. The
    /// stream ends when the drain starts stopping.
    pub fn incoming<L, P, F, T>(
        &self,
        what: &'static str,
        listener: L,
        prepare: P,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<T>>
    where
        L: Listener,
        P: Fn(L::Io, L::Addr) -> F + Send + Sync + 'static,
        F: Future<Output = Option<T>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        self.serve(what, listener, move |io, peer| {
            let tx = tx.clone();
            let prepared = prepare(io, peer);
            async move {
                if let Some(conn) = prepared.await {
                    let _ = tx.send(Ok(conn)).await;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Stops everything at once (a failed start, a dropped component).
    pub fn stop_now(&self) {
        self.stopping.cancel();
        self.aborting.cancel();
        self.killed.cancel();
    }

    /// The whole shutdown: stop accepting, let what runs finish for up to
    /// `grace`, then abort it. True when everything ended within the grace.
    pub async fn drain(&self, grace: Duration) -> bool {
        let span = tracing::info_span!("serve.drain", grace_ms = grace.as_millis() as u64);
        async {
            tracing::info!(open = self.open(), "draining");
            self.stopping.cancel();
            self.tasks.close();
            let drained = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
            if !drained {
                tracing::warn!(
                    open = self.open(),
                    "grace period over; closing what is still open"
                );
            }
            self.aborting.cancel();
            if tokio::time::timeout(ABORT_WAIT, self.tasks.wait())
                .await
                .is_err()
            {
                self.killed.cancel();
                self.tasks.wait().await;
            }
            drained
        }
        .instrument(span)
        .await
    }
}

/// `task` until it ends or `killed` is cancelled. The task is boxed: an
/// async block that captures a future and then moves it into a `select!`
/// keeps room for it twice (the capture and the select's copy; rustc never
/// overlaps captures), which doubled every connection task's allocation.
fn until_killed<F>(task: F, killed: CancellationToken) -> impl Future<Output = ()> + Send
where
    F: Future<Output = ()> + Send + 'static,
{
    let task = Box::pin(task);
    async move {
        tokio::select! {
            _ = task => {}
            _ = killed.cancelled() => {}
        }
    }
}

/// The accept loop: until `stop`, hands each accepted connection to
/// `spawn`. Accept errors are logged and backed off, never fatal.
async fn accept_loop<L: Listener>(
    what: &'static str,
    listener: &L,
    stop: &CancellationToken,
    mut spawn: impl FnMut(L::Io, L::Addr),
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((io, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                spawn(io, peer);
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, retry_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// An admin page's answer.
pub type Reply = Response<Full<Bytes>>;

/// `Content-Type` of OpenMetrics text (prometheus-client's encoding).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// prometheus-client's OpenMetrics text as the classic Prometheus text
/// format ([`PROMETHEUS_TEXT`]), which Prometheus, promtool and istiod's
/// and pilot-agent's dashboards read: the same series, with each counter's
/// `# HELP`/`# TYPE` named as its `_total` samples, and no `# EOF`/`# UNIT`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// `Content-Type` of JSON pages.
pub const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

type ReadyFn = dyn Fn() -> Result<(), String> + Send + Sync;
type TextFn = dyn Fn() -> String + Send + Sync;
type RouteFn =
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync;

enum Page {
    Get(&'static str, Box<TextFn>),
    Custom(Box<RouteFn>),
}

/// The admin HTTP/1 server every component runs: `/ready` (also Istio's
/// `/healthz/ready`), `/metrics` (also Envoy's `/stats/prometheus`), the
/// component's own pages, `/` listing them, 404 for the rest.
pub struct AdminRouter {
    component: &'static str,
    ready: Box<ReadyFn>,
    metrics: Option<(&'static str, Box<TextFn>)>,
    pages: Vec<(&'static str, Page)>,
}

impl std::fmt::Debug for AdminRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminRouter")
            .field("component", &self.component)
            .field("pages", &self.paths())
            .finish()
    }
}

/// A response with a body and its type.
pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// A `text/plain` response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    reply(status, TEXT, body.into())
}

impl AdminRouter {
    /// `ready` says whether the component can do its job (`Err(why)`
    /// otherwise); `/ready` answers 200 `ready` or 503 with the reason.
    pub fn new(
        component: &'static str,
        ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        AdminRouter {
            component,
            ready: Box::new(ready),
            metrics: None,
            pages: Vec::new(),
        }
    }

    /// `/metrics`: `render` encodes the registry, served as `content_type`
    /// ([`OPENMETRICS`] or [`PROMETHEUS_TEXT`]).
    pub fn metrics(
        mut self,
        content_type: &'static str,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        self.metrics = Some((content_type, Box::new(render)));
        self
    }

    /// A GET page answering the document `doc` builds, as pretty JSON.
    pub fn json<T: serde::Serialize>(
        self,
        path: &'static str,
        doc: impl Fn() -> T + Send + Sync + 'static,
    ) -> Self {
        self.get(path, JSON, move || {
            serde_json::to_string_pretty(&doc()).unwrap_or_default() + "\n"
        })
    }

    /// A GET page answering what `render` writes, as `content_type`.
    pub fn get(
        mut self,
        path: &'static str,
        content_type: &'static str,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        self.pages
            .push((path, Page::Get(content_type, Box::new(render))));
        self
    }

    /// A page answering every method itself (one that reads a body).
    pub fn route<F>(
        mut self,
        path: &'static str,
        handle: impl Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    ) -> Self
    where
        F: Future<Output = Reply> + Send + 'static,
    {
        self.pages.push((
            path,
            Page::Custom(Box::new(move |req| Box::pin(handle(req)))),
        ));
        self
    }

    fn paths(&self) -> Vec<&'static str> {
        let mut paths = vec!["/ready"];
        if self.metrics.is_some() {
            paths.push("/metrics");
        }
        paths.extend(self.pages.iter().map(|(p, _)| *p));
        paths
    }

    /// Answers one request. While `draining`, `/ready` says 503.
    pub async fn handle(&self, req: Request<Incoming>, draining: bool) -> Reply {
        let path = req.uri().path().to_owned();
        if let Some((_, Page::Custom(handle))) = self.pages.iter().find(|(p, _)| *p == path) {
            return handle(req).await;
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        self.answer_get(&path, draining)
    }

    fn answer_get(&self, path: &str, draining: bool) -> Reply {
        match path {
            "/ready" | "/healthz/ready" if draining => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            "/ready" | "/healthz/ready" => match (self.ready)() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            },
            "/metrics" | "/stats/prometheus" if self.metrics.is_some() => {
                let (ctype, render) = self.metrics.as_ref().expect("checked");
                reply(StatusCode::OK, ctype, render())
            }
            "/" => text(
                StatusCode::OK,
                format!("{} admin: {}\n", self.component, self.paths().join(" ")),
            ),
            _ => match self.pages.iter().find(|(p, _)| *p == path) {
                Some((_, Page::Get(ctype, render))) => reply(StatusCode::OK, ctype, render()),
                _ => text(
                    StatusCode::NOT_FOUND,
                    format!("not found; try {}\n", self.paths().join(", ")),
                ),
            },
        }
    }

    /// Serves on `listener` as part of `drain`. The admin port stays up
    /// while connections drain (answering `/ready` with 503) and closes when
    /// the drain aborts; it never holds the drain up.
    pub fn serve(self, listener: TcpListener, drain: &Drain) {
        let router = Arc::new(self);
        let drain = drain.clone();
        tokio::spawn(async move {
            let until = drain.aborting().clone();
            accept_loop("admin", &listener, &until, |tcp, peer| {
                let router = router.clone();
                let drain = drain.clone();
                tokio::spawn(async move {
                    let stopping = drain.stopping().clone();
                    let service = hyper::service::service_fn(move |req| {
                        let router = router.clone();
                        let draining = stopping.is_cancelled();
                        async move { Ok::<_, Infallible>(router.handle(req, draining).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service);
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            tracing::debug!(peer.addr = %peer, error = %e, "admin connection ended");
                        },
                        _ = drain.aborting().cancelled() => {}
                    }
                });
            })
            .await
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_classic_text() {
        let om = "# HELP reqs Requests.\n# TYPE reqs counter\nreqs_total{a=\"b\"} 1\n# HELP up Up.\n# TYPE up gauge\n# UNIT up seconds\nup 1\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP reqs_total Requests.\n# TYPE reqs_total counter\nreqs_total{a=\"b\"} 1\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }

    /// A connection's task is the size of its future (boxed once), not
    /// twice it: the drain's wrapper must not hold a second copy.
    #[test]
    fn a_drained_task_holds_its_future_once() {
        async fn connection() {
            let buf = [7u8; 4096];
            tokio::task::yield_now().await;
            assert_eq!(buf[4095], 7);
        }
        let task = connection();
        let alone = std::mem::size_of_val(&task);
        assert!(alone >= 4096, "{alone}");
        let wrapped = std::mem::size_of_val(&until_killed(task, CancellationToken::new()));
        assert!(
            wrapped < 1024,
            "the wrapper takes {wrapped} bytes for a {alone}-byte future"
        );
    }

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn bound() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// Echoes one read back after `delay`.
    fn slow_echo(
        delay: Duration,
        done: Arc<AtomicUsize>,
    ) -> impl Fn(TcpStream, std::net::SocketAddr) -> Pin<Box<dyn Future<Output = ()> + Send>>
    + Send
    + Sync
    + 'static {
        move |mut s, _| {
            let done = done.clone();
            Box::pin(async move {
                let mut buf = [0u8; 16];
                let n = s.read(&mut buf).await.unwrap_or(0);
                tokio::time::sleep(delay).await;
                let _ = s.write_all(&buf[..n]).await;
                done.fetch_add(1, Ordering::SeqCst);
            })
        }
    }

    #[tokio::test]
    async fn drain_lets_an_open_connection_finish_within_the_grace() {
        let (l, addr) = bound().await;
        let drain = Drain::new();
        let done = Arc::new(AtomicUsize::new(0));
        drain.serve(
            "test",
            l,
            slow_echo(Duration::from_millis(200), done.clone()),
        );
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(drain.drain(Duration::from_secs(5)).await, "drained in time");
        assert_eq!(done.load(Ordering::SeqCst), 1);
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[tokio::test]
    async fn drain_aborts_what_outlives_the_grace() {
        let (l, addr) = bound().await;
        let drain = Drain::new();
        let done = Arc::new(AtomicUsize::new(0));
        drain.serve("test", l, slow_echo(Duration::from_secs(60), done.clone()));
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(drain.open(), 2, "the accept loop and one connection");
        let started = std::time::Instant::now();
        assert!(!drain.drain(Duration::from_millis(200)).await);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(
            took < Duration::from_millis(200) + ABORT_WAIT * 3,
            "{took:?}"
        );
        assert_eq!(done.load(Ordering::SeqCst), 0, "dropped, not finished");
        assert_eq!(drain.open(), 0);
        // The handler's socket was dropped: the client sees EOF.
        let mut buf = [0u8; 2];
        assert_eq!(c.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_handler_watching_aborting_winds_down_itself() {
        let (l, addr) = bound().await;
        let drain = Drain::new();
        let cut = Arc::new(AtomicBool::new(false));
        let (d, c2) = (drain.clone(), cut.clone());
        drain.serve("test", l, move |_s, _| {
            let (d, cut) = (d.clone(), c2.clone());
            async move {
                d.aborting().cancelled().await;
                cut.store(true, Ordering::SeqCst);
            }
        });
        let _c = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        assert!(!drain.drain(Duration::from_millis(100)).await);
        assert!(started.elapsed() < ABORT_WAIT, "no wait for the kill");
        assert!(cut.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn stopping_closes_the_listener() {
        let (l, addr) = bound().await;
        let drain = Drain::new();
        let served = Arc::new(AtomicUsize::new(0));
        let s2 = served.clone();
        drain.serve("test", l, move |_s, _| {
            s2.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert!(drain.drain(Duration::from_secs(1)).await);
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "a new connect is refused"
        );
        assert_eq!(served.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unix_listeners_use_the_same_loop() {
        let path = std::env::temp_dir().join(format!(
            "meshid-serve-{}-{:?}.sock",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let drain = Drain::new();
        drain.serve(
            "unix",
            UnixListener::bind(&path).unwrap(),
            |mut s: tokio::net::UnixStream, _| async move {
                let _ = s.write_all(b"hello").await;
            },
        );
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello");
        assert!(drain.drain(Duration::from_secs(1)).await);
        assert!(tokio::net::UnixStream::connect(&path).await.is_err());
        let _ = std::fs::remove_file(&path);
    }

    /// Fails `failures` accepts, then accepts forever from a channel.
    struct Flaky {
        failures: AtomicUsize,
        conns: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<u32>>,
    }

    impl Listener for Flaky {
        type Io = u32;
        type Addr = ();
        async fn accept(&self) -> io::Result<(u32, ())> {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(io::Error::other("Too many open files"));
            }
            match self.conns.lock().await.recv().await {
                Some(n) => Ok((n, ())),
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_and_never_end_the_loop() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let flaky = Flaky {
            failures: AtomicUsize::new(5),
            conns: tokio::sync::Mutex::new(rx),
        };
        let drain = Drain::new();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        drain.serve("flaky", flaky, move |n, ()| {
            let _ = seen_tx.send(n);
            async {}
        });
        let started = tokio::time::Instant::now();
        tx.send(7).await.unwrap();
        assert_eq!(seen.recv().await, Some(7));
        // 50 + 100 + 200 + 400 + 800 ms of backoff.
        assert!(started.elapsed() >= Duration::from_millis(1550));
        tx.send(8).await.unwrap();
        assert_eq!(seen.recv().await, Some(8));
        assert!(drain.drain(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn incoming_yields_what_prepare_keeps() {
        use tokio_stream::StreamExt;
        let (l, addr) = bound().await;
        let drain = Drain::new();
        let mut incoming = drain.incoming("test", l, |mut s: TcpStream, _| async move {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.ok()?;
            (b[0] == b'y').then_some(s)
        });
        let mut refused = TcpStream::connect(addr).await.unwrap();
        refused.write_all(b"n").await.unwrap();
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"y").await.unwrap();
        let got = incoming.next().await.unwrap().unwrap();
        assert_eq!(got.peer_addr().unwrap(), kept.local_addr().unwrap());
        assert!(drain.drain(Duration::from_secs(1)).await);
        assert!(incoming.next().await.is_none(), "the stream ends");
    }

    async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split(' ').nth(1).unwrap().parse().unwrap();
        let ctype = out
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_owned();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (code, ctype, body)
    }

    #[tokio::test]
    async fn the_admin_router_answers_ready_metrics_json_and_404() {
        let (l, addr) = bound().await;
        let ready = Arc::new(AtomicBool::new(false));
        let r2 = ready.clone();
        let drain = Drain::new();
        AdminRouter::new("test", move || {
            if r2.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not ready: no certificate".into())
            }
        })
        .metrics(OPENMETRICS, || "up 1\n# EOF\n".into())
        .json("/debug/certs", || serde_json::json!({"serial": "01"}))
        .route("/echo", |req: Request<Incoming>| async move {
            text(StatusCode::OK, req.method().to_string())
        })
        .serve(l, &drain);

        let (code, _, body) = get(addr, "GET", "/ready").await;
        assert_eq!((code, body.as_str()), (503, "not ready: no certificate\n"));
        ready.store(true, Ordering::SeqCst);
        let (code, ctype, body) = get(addr, "GET", "/healthz/ready").await;
        assert_eq!((code, body.as_str()), (200, "ready\n"));
        assert_eq!(ctype, "text/plain; charset=utf-8");

        let (code, ctype, body) = get(addr, "GET", "/metrics").await;
        assert_eq!((code, ctype.as_str()), (200, OPENMETRICS));
        assert_eq!(body, "up 1\n# EOF\n");
        assert_eq!(get(addr, "GET", "/stats/prometheus").await.2, body);

        let (code, ctype, body) = get(addr, "GET", "/debug/certs").await;
        assert_eq!((code, ctype.as_str()), (200, "application/json"));
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["serial"], "01");
        assert_eq!(get(addr, "POST", "/debug/certs").await.0, 405);
        assert_eq!(get(addr, "PUT", "/echo").await.2, "PUT");

        let (code, _, body) = get(addr, "GET", "/nope").await;
        assert_eq!(code, 404);
        assert_eq!(
            body,
            "not found; try /ready, /metrics, /debug/certs, /echo\n"
        );
        let (code, _, body) = get(addr, "GET", "/").await;
        assert_eq!(code, 200);
        assert!(body.starts_with("test admin: /ready"), "{body}");

        // Draining: still serving, not ready; gone once the drain ends.
        drain.stopping().cancel();
        let (code, _, body) = get(addr, "GET", "/ready").await;
        assert_eq!((code, body.as_str()), (503, "draining\n"));
        drain.drain(Duration::from_millis(10)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}

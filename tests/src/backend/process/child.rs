//! Supervised child processes for the process backend: each component runs
//! with its output in a log file, is stopped with SIGTERM and then SIGKILL
//! after a grace period, and is killed when its handle drops, so a failing
//! suite, a panic or Ctrl-C leaves no process behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use tokio::process::{Child, Command};

use crate::Error;

/// How to start one component.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
}

impl Spec {
    pub fn new(name: &str, program: impl Into<PathBuf>, cwd: impl Into<PathBuf>) -> Self {
        Spec {
            name: name.to_owned(),
            program: program.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: cwd.into(),
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.insert(k.to_owned(), v.into());
        self
    }
}

/// A running component.
#[derive(Debug)]
pub struct Managed {
    pub spec: Spec,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Managed {
    /// Starts `spec`, appending its stdout and stderr to `<log_dir>/<name>.log`.
    pub fn start(spec: Spec, log_dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(log_dir).map_err(|e| Error::io(log_dir, e))?;
        let log = log_dir.join(format!("{}.log", spec.name.replace('/', "_")));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::io(&log, e))?;
        let err = out.try_clone().map_err(|e| Error::io(&log, e))?;
        std::fs::create_dir_all(&spec.cwd).map_err(|e| Error::io(&spec.cwd, e))?;
        // The run's own temp dir (beside logs/): whatever a component puts
        // in its temp dir stays in the run's directory, which the secrets
        // scan reads (crate::secrets).
        let tmp = log_dir.parent().unwrap_or(log_dir).join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let child = Command::new(&spec.program)
            .args(&spec.args)
            .env("TMPDIR", &tmp)
            .envs(&spec.env)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Component {
                name: spec.name.clone(),
                message: format!("could not start {}: {e}", spec.program.display()),
            })?;
        Ok(Managed {
            spec,
            log,
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` (SIGSTOP / SIGCONT to freeze and thaw); an error when
    /// the process is not running.
    pub fn signal(&mut self, signal: Signal) -> Result<(), Error> {
        let fail = |message: String| Error::Component {
            name: self.spec.name.clone(),
            message,
        };
        let pid = self
            .pid()
            .and_then(|p| Pid::from_raw(p as i32))
            .ok_or_else(|| fail(format!("cannot send {signal:?}: not running")))?;
        kill_process(pid, signal).map_err(|e| fail(format!("sending {signal:?}: {e}")))
    }

    /// SIGTERM, then SIGKILL after `grace`. Idempotent.
    pub async fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|p| Pid::from_raw(p as i32)) {
            let _ = kill_process(pid, Signal::TERM);
            // A frozen process handles SIGTERM only once thawed.
            let _ = kill_process(pid, Signal::CONT);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

/// The last `lines` lines of a file (empty when unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_terminates_and_logs_are_kept() {
        let dir = std::env::temp_dir().join(format!("meshid-proc-{}", std::process::id()));
        let spec =
            Spec::new("sleeper", "/bin/sh", &dir).args(["-c", "echo started; exec sleep 30"]);
        let mut p = Managed::start(spec, &dir).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(p.is_running());
        p.stop(Duration::from_secs(2)).await;
        assert!(!p.is_running());
        assert_eq!(p.log_tail(5), "started");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        let dir = std::env::temp_dir().join(format!("meshid-proc2-{}", std::process::id()));
        let spec = Spec::new("stubborn", "/bin/sh", &dir).args(["-c", "trap '' TERM; sleep 30"]);
        let mut p = Managed::start(spec, &dir).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = std::time::Instant::now();
        p.stop(Duration::from_millis(300)).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!p.is_running());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_frozen_process_is_thawed_and_still_stops() {
        let dir = std::env::temp_dir().join(format!("meshid-proc3-{}", std::process::id()));
        let spec = Spec::new("ticker", "/bin/sh", &dir)
            .args(["-c", "while true; do echo t; sleep 0.05; done"]);
        let mut p = Managed::start(spec, &dir).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        p.signal(Signal::STOP).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let frozen = std::fs::read_to_string(&p.log).unwrap().len();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(std::fs::read_to_string(&p.log).unwrap().len(), frozen);
        p.signal(Signal::CONT).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(std::fs::read_to_string(&p.log).unwrap().len() > frozen);
        // Frozen again, a stop still ends it within the grace (SIGCONT follows SIGTERM).
        p.signal(Signal::STOP).unwrap();
        let t = std::time::Instant::now();
        p.stop(Duration::from_secs(3)).await;
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(p.signal(Signal::CONT).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let dir = std::env::temp_dir();
        let err = Managed::start(Spec::new("ghost", "/nonexistent/meshid-ghost", &dir), &dir)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("could not start /nonexistent/meshid-ghost"),
            "{err}"
        );
    }
}

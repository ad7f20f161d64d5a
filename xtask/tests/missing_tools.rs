//! `cargo xtask kind …` and `cargo xtask e2e --backend kind` stop at once,
//! with a sentence naming the missing tool and exit code 2, when kind,
//! kubectl, docker or python3 is not on PATH (here: a PATH holding nothing).

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn every_kind_command_stops_with_exit_code_2_when_its_tools_are_missing() {
    let exe = env!("CARGO_BIN_EXE_xtask");
    let empty = std::env::temp_dir().join(format!("xtask-empty-path-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    for (cmd, named) in [
        (&["kind", "up"][..], "kind and docker"),
        (&["kind", "load"], "kind and docker"),
        (&["kind", "deploy"], "kubectl"),
        (&["kind", "down"], "kind"),
        (&["kind", "validate"], "kubectl and python3"),
        (&["e2e", "--backend", "kind"], "kind and kubectl and docker"),
    ] {
        let started = Instant::now();
        let out = Command::new(exe)
            .args(cmd)
            .env("PATH", &empty)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
        assert!(
            err.contains(&format!("needs {named} on PATH")),
            "{cmd:?} should name {named}: {err}"
        );
        // At once: nothing was built, rendered or started first.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{cmd:?} took {:?}",
            started.elapsed()
        );
    }
    let _ = std::fs::remove_dir_all(&empty);
}

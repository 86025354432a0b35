//! `cargo xtask coordinator-image [--profile release|dev] [--out DIR]`: the coordinator's OCI
//! image, as an OCI image layout directory (what `skopeo copy oci:DIR docker://...` and
//! `crane push` read), built without a registry or a Docker daemon.
//!
//! One layer: the stripped `acl-coordinator` binary and the shared libraries it loads (found
//! with `ldd`, copied from the build machine), nothing else: no shell, no package manager. The
//! tar has sorted names, one time stamp and owner root, so the same binary and libraries give
//! the same image digest (`cargo xtask test` builds it twice and compares). Before writing the
//! layout, the binary is run from the layer's tree with `chroot`, which proves the layer holds
//! everything it needs.

use crate::image::Profile;
use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use xshell::{Shell, cmd};

/// The image's name in the layout's index.
const NAME: &str = concat!("acl-coordinator:", env!("CARGO_PKG_VERSION"));

/// `cargo xtask coordinator-image ...`.
pub(crate) fn cli(sh: &Shell, args: &[&str]) -> Result<()> {
    let (mut profile, mut out) = (Profile::Release, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().map(|s| s.to_string()).with_context(|| format!("{a} needs a value"));
        match *a {
            "--profile" => {
                profile = match val()?.as_str() {
                    "release" => Profile::Release,
                    "dev" => Profile::Dev,
                    other => bail!("--profile {other}: expected release or dev"),
                }
            }
            "--out" => out = Some(PathBuf::from(val()?)),
            other => bail!(
                "unknown option {other} (usage: cargo xtask coordinator-image [--profile release|dev] [--out DIR])"
            ),
        }
    }
    let out = out.unwrap_or_else(|| sh.current_dir().join("target/oci/acl-coordinator"));
    let digest = build(sh, profile, &out)?;
    println!("OCI image layout {} ({NAME}, manifest {digest})", out.display());
    println!("push it with: skopeo copy oci:{} docker://REGISTRY/{NAME}", out.display());
    Ok(())
}

/// Builds the binary with `profile` and the image layout into `out`; the manifest's digest.
pub(crate) fn build(sh: &Shell, profile: Profile, out: &Path) -> Result<String> {
    let p = profile.name();
    cmd!(sh, "cargo build --quiet --profile {p} --locked -p coordinator").run()?;
    let bin = profile.bin(&sh.current_dir(), "acl-coordinator");
    let rootfs = out.with_extension("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let dst = rootfs.join("usr/bin/acl-coordinator");
    std::fs::create_dir_all(dst.parent().expect("has a parent"))?;
    cmd!(sh, "strip --strip-all -o {dst} {bin}").run().context("strip acl-coordinator")?;
    for lib in shared_libraries(sh, &dst)? {
        let to = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(to.parent().expect("has a parent"))?;
        // The file itself, under the name the loader asks for (not a symlink into the host).
        std::fs::copy(&lib, &to).with_context(|| format!("copy {}", lib.display()))?;
    }
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    // It runs from its own tree: every library it needs is there.
    let version = cmd!(sh, "chroot {rootfs} /usr/bin/acl-coordinator --version")
        .read()
        .context("the image's binary does not run in its own tree (chroot)")?;
    if !version.contains(env!("CARGO_PKG_VERSION")) {
        bail!("acl-coordinator --version in the image said {version:?}");
    }
    let epoch = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|e| e.parse().ok()).unwrap_or(0);
    let digest = crate::oci::layout(sh, &rootfs, out, NAME, &["/usr/bin/acl-coordinator".to_owned()], epoch)?;
    std::fs::remove_dir_all(&rootfs)?;
    Ok(digest)
}

/// The absolute paths `ldd` names for `bin`: each library and the dynamic loader.
fn shared_libraries(sh: &Shell, bin: &Path) -> Result<Vec<PathBuf>> {
    let text = cmd!(sh, "ldd {bin}").read().context("ldd")?;
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if libs.is_empty() {
        bail!("ldd named no library for {} ({text})", bin.display());
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// What `cargo xtask test` checks: built twice from the test build, the same digest.
pub(crate) fn check_reproducible(sh: &Shell) -> Result<()> {
    let t = std::time::Instant::now();
    let root = sh.current_dir().join("target/oci");
    let a = build(sh, Profile::Dev, &root.join("check-a"))?;
    let b = build(sh, Profile::Dev, &root.join("check-b"))?;
    if a != b {
        bail!("the coordinator image is not reproducible: {a} then {b}");
    }
    println!(
        "coordinator image: built twice, same manifest {a}, runs in its own tree ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

//! OCI images made at image-build time, for the node's containerd to import at boot: a
//! container workload without a registry or a Docker daemon.
//!
//! One layer (an uncompressed tar of the files named in the recipe, statically linked programs
//! copied from the image tree), a config, a manifest and an index, packed as an OCI image
//! layout archive, the format `ctr images import` reads. Every tar is made with sorted names,
//! the recipe's epoch as every time stamp and owner root, so the archive is reproducible like
//! the image around it. The index names the image with `io.containerd.image.name`, which is
//! the name containerd gives it on import.

use anyhow::{Context as _, Result};
use serde::Deserialize;
use serde_json::json;
use std::path::Path;
use xshell::{Shell, cmd};

/// A `[[container]]` of a recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContainerSpec {
    /// Where the OCI archive goes in the OS image.
    path: String,
    /// The image's name in containerd, e.g. `localhost/acl-web:1`.
    name: String,
    /// Files copied from the OS image's tree to the same path in the container (statically
    /// linked programs: the container has no libraries).
    #[serde(default)]
    copy: Vec<String>,
    /// Files of the container, with their text.
    #[serde(default)]
    file: Vec<ContainerFile>,
    /// The command the container runs.
    cmd: Vec<String>,
}

/// A text file in a container.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerFile {
    path: String,
    text: String,
}

/// Builds the OCI archive of `spec` into `tree`.
pub(crate) fn build(sh: &Shell, tree: &Path, spec: &ContainerSpec, epoch: i64) -> Result<()> {
    let work = tempdir(tree, &spec.name)?;
    let rootfs = work.join("rootfs");
    for f in &spec.copy {
        let (src, dst) = (tree.join(f.trim_start_matches('/')), rootfs.join(f.trim_start_matches('/')));
        std::fs::create_dir_all(dst.parent().expect("has a parent"))?;
        std::fs::copy(&src, &dst).with_context(|| format!("container {}: copy {f}", spec.name))?;
    }
    for f in &spec.file {
        let dst = rootfs.join(f.path.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().expect("has a parent"))?;
        std::fs::write(&dst, &f.text)?;
    }
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    let layout_dir = work.join("layout");
    layout(sh, &rootfs, &layout_dir, &spec.name, &spec.cmd, epoch)?;
    let out = tree.join(spec.path.trim_start_matches('/'));
    std::fs::create_dir_all(out.parent().expect("has a parent"))?;
    reproducible_tar(sh, &layout_dir, &out, epoch)?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Writes an OCI image layout (a directory: `oci-layout`, `index.json`, `blobs/sha256/`) of
/// one uncompressed layer made of `rootfs`, named `name`, running `cmd`. Returns the image
/// manifest's digest.
pub(crate) fn layout(
    sh: &Shell,
    rootfs: &Path,
    layout: &Path,
    name: &str,
    cmd: &[String],
    epoch: i64,
) -> Result<String> {
    let _ = std::fs::remove_dir_all(layout);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer_tar = layout.join("layer.tar.tmp");
    reproducible_tar(sh, rootfs, &layer_tar, epoch)?;
    let layer = blob(&blobs, &std::fs::read(&layer_tar)?)?;
    std::fs::remove_file(&layer_tar)?;
    let created = jiff::Timestamp::from_second(epoch)?.to_string();
    let config = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd, "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [layer.0] },
        "history": [{ "created": created, "created_by": "cargo xtask" }],
    });
    let config = blob(&blobs, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1 },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.0, "size": layer.1 }],
    });
    let manifest = blob(&blobs, &serde_json::to_vec(&manifest)?)?;
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest.0,
            "size": manifest.1,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(manifest.0)
}

/// Writes a blob under its digest; its `sha256:...` digest and size.
fn blob(blobs: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let hex = manifest::Sha256Digest::of(bytes).to_string();
    std::fs::write(blobs.join(&hex), bytes)?;
    Ok((format!("sha256:{hex}"), bytes.len() as u64))
}

/// A tar of `dir`'s contents with nothing of the build machine in it.
fn reproducible_tar(sh: &Shell, dir: &Path, out: &Path, epoch: i64) -> Result<()> {
    let mtime = format!("--mtime=@{epoch}");
    cmd!(sh, "tar --sort=name {mtime} --owner=0 --group=0 --numeric-owner --format=gnu -C {dir} -cf {out} .")
        .quiet()
        .run()?;
    Ok(())
}

/// A scratch directory beside the tree (not inside it: it must not end up in the image).
fn tempdir(tree: &Path, name: &str) -> Result<std::path::PathBuf> {
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let d = tree.parent().context("the tree has a parent")?.join(format!("oci-{safe}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

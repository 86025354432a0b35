//! `cargo xtask bench delta`: what a node downloads for an update between real images built
//! from `image-recipes/` (Debian packages, erofs, dracut), for typical changes, next to two
//! baselines from the same run: the whole payload (what Flatcar and Bottlerocket fetch) and
//! `zstd --patch-from` of the old file system to the new one (a per-pair delta, the practical
//! lower bound).
//!
//! "Fetched" is what the installer requests when the other slot holds the old image: the new
//! signed manifest (read on every update; counted as the gzip copy a repository holds beside
//! it, which nginx sends with `gzip_static on` and the agent decodes), and every frame of a chunk whose digest the old
//! manifest does not list, except the dm-verity tree when the node computes it
//! (`install::plan` fetches exactly those frames, adjacent ones in one request).
//!
//! The package upgrade is libssl3 from the previous Debian security release (pinned with the
//! recipe's `pin`) to apt's candidate: the base image is the new side there.

use crate::image::{self, ImageArgs, Profile};
use anyhow::{Context as _, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use xshell::{Shell, cmd};

/// The package upgraded, and the version the old image pins (apt's lists hold both).
const UPGRADED: (&str, &str) = ("libssl3", "3.0.20-1~deb12u2");

/// A change measured: its name, the recipe of the side that is not the base (which includes
/// the base), whether that side is the old one, and the goal.
struct Change {
    name: &'static str,
    recipe: String,
    base_is_new: bool,
    goal: &'static str,
}

fn changes(base: &Path) -> Vec<Change> {
    let inc = format!("include = {:?}\n", base.join("node.toml"));
    vec![
        Change {
            name: "one 33-byte configuration file added",
            recipe: format!(
                "{inc}[[file]]\npath = \"/etc/acl-update/bench.conf\"\ntext = \"# one setting changed\\nkey = 1\\n\"\n"
            ),
            base_is_new: false,
            goal: "<= 1 %",
        },
        Change {
            name: "one package added (jq)",
            recipe: format!("{inc}packages = [\"jq\"]\n"),
            base_is_new: false,
            goal: "<= 3 %",
        },
        Change {
            name: "one package upgraded (libssl3 3.0.20 -> 3.0.22, a security release)",
            recipe: format!("{inc}[pin]\n{} = {:?}\n", UPGRADED.0, UPGRADED.1),
            base_is_new: true,
            goal: "<= 3 %",
        },
        Change {
            name: "kernel build 6.1.0-56 -> 6.1.0-50",
            recipe: format!("include = {:?}\n", base.join("node-kernel-50.toml")),
            base_is_new: false,
            goal: "<= 30 %",
        },
    ]
}

/// Frames of `m` (offset -> length).
fn frames(m: &manifest::Manifest) -> BTreeMap<u64, u64> {
    m.chunks.iter().map(|c| (c.offset, u64::from(c.length))).collect()
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

pub(crate) fn run(sh: &Shell) -> Result<()> {
    crate::tools::ensure(sh, &crate::tools::BENCH_TOOLS)?;
    crate::tools::ensure(sh, &image::IMAGE_TOOLS)?;
    image::build_binaries(sh, Profile::Dev)?;
    let root = sh.current_dir();
    let dir = root.join("target/bench/delta");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("trust"))?;
    std::fs::create_dir_all(dir.join("recipes"))?;
    let aclpub = Profile::Dev.bin(&root, "aclpub");
    {
        let _d = sh.push_dir(&dir);
        cmd!(sh, "{aclpub} keygen --out keys bench").quiet().ignore_stdout().run()?;
    }
    std::fs::copy(dir.join("keys/bench.pub"), dir.join("trust/bench.pub"))?;
    let build = |recipe: PathBuf, version: &str, name: &str| -> Result<(PathBuf, manifest::Manifest)> {
        let work = dir.join(name);
        let t = std::time::Instant::now();
        let b = image::build(
            sh,
            &ImageArgs {
                profile: Profile::Dev,
                recipe,
                version: version.into(),
                work: work.clone(),
                repo: None,
                keys: vec![dir.join("keys/bench.key")],
                trust: dir.join("trust"),
            },
        )?;
        println!("  built {name} in {:.0} s", t.elapsed().as_secs_f64());
        let m = manifest::Manifest::from_bytes(&std::fs::read(b.build.join("manifest.json"))?)?;
        Ok((work.join("fs.erofs"), m))
    };
    println!("bench delta: real images from image-recipes/ (this takes a few minutes)");
    let (base_fs, base) = build(root.join("image-recipes/node.toml"), "1.0.0", "base")?;
    let mut rows = Vec::new();
    for (i, c) in changes(&root.join("image-recipes")).into_iter().enumerate() {
        let recipe = dir.join("recipes").join(format!("change-{i}.toml"));
        std::fs::write(&recipe, &c.recipe)?;
        let name = format!("change-{i}");
        let (other_fs, other) = build(recipe, if c.base_is_new { "0.9.0" } else { "1.1.0" }, &name)?;
        let ((old_fs, old), (new_fs, new, new_dir)) = if c.base_is_new {
            ((other_fs, other), (base_fs.clone(), base.clone(), "base".to_owned()))
        } else {
            ((base_fs.clone(), base.clone()), (other_fs, other, name.clone()))
        };
        let payload: u64 = frames(&new).values().sum();
        let manifest_doc = std::fs::read(dir.join(format!("{new_dir}/build/manifest.json")))?;
        let manifest_len = repo::layout::gzip_document(&manifest_doc).len() as u64;
        let got = e2e::fetched_bytes(&old, &new) + manifest_len;
        let patch = dir.join(format!("change-{i}.zst"));
        // (zstd's advice on tuning its optimal parser goes to stderr; only the exit status counts)
        cmd!(sh, "zstd -q -f -19 --long=28 --patch-from={old_fs} {new_fs} -o {patch}")
            .quiet()
            .ignore_stderr()
            .run()
            .context("zstd --patch-from")?;
        let patch_bytes = std::fs::metadata(&patch)?.len();
        rows.push((c.name, got, manifest_len, payload, patch_bytes, c.goal));
    }
    println!(
        "\n| change | fetched | of which the manifest (gzip) | share of the new payload | goal | whole payload (Flatcar, Bottlerocket) | zstd --patch-from, per pair |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, got, manifest_len, payload, patch, goal) in rows {
        let share = |b: u64| 100.0 * b as f64 / payload as f64;
        println!(
            "| {name} | {} | {} | {:.2} % | {goal} | {} (100 %) | {} ({:.1} %) |",
            mb(got),
            mb(manifest_len),
            share(got),
            mb(payload),
            mb(patch),
            share(patch)
        );
    }
    println!(
        "\nzstd --patch-from is of the file system alone (the dm-verity tree is left out: a node could compute \
         it), at level 19 with a 256 MiB window."
    );
    Ok(())
}

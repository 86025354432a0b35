//! Debian packages for image recipes: the dependency closure of the packages a recipe names,
//! resolved from apt's package lists (`apt-cache show`), and the `.deb` files, downloaded once
//! into a cache.
//!
//! Why not `apt-get install --download-only`: that resolves against the *host's* installed
//! packages, so the image would depend on what the build machine happens to have. Here the
//! closure starts empty: every package the image needs is in it, whatever the host runs.
//! Only `Depends` and `Pre-Depends` are followed (no recommends). Of alternatives, the first
//! already chosen wins, else the first real package; a recipe's `exclude-packages` cuts what
//! an image without maintainer scripts does not need (debconf, adduser, perl).
//!
//! Every package is fetched at an exact version, apt's candidate unless the recipe pins
//! another one its lists hold (an older security release, to measure an upgrade), so the cache
//! can hold several versions of a package and a build takes the one it asked for.

use anyhow::{Context as _, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use xshell::{Shell, cmd};

/// One package's stanza, as much as the resolver needs.
#[derive(Debug, Clone, Default)]
struct Stanza {
    /// Dependency groups: any one alternative satisfies a group.
    depends: Vec<Vec<String>>,
    /// Virtual packages it provides.
    provides: Vec<String>,
    /// apt's candidate version.
    version: String,
}

/// Every package in the closure of `roots`, as `name=version` (the candidate, or the version
/// `pins` names), sorted by name.
pub(crate) fn closure(
    sh: &Shell,
    roots: &[String],
    exclude: &[String],
    pins: &BTreeMap<String, String>,
) -> Result<Vec<String>> {
    let exclude: BTreeSet<&str> = exclude.iter().map(String::as_str).collect();
    let mut chosen: BTreeMap<String, Stanza> = BTreeMap::new();
    let mut known: BTreeMap<String, Option<Stanza>> = BTreeMap::new();
    let mut todo: Vec<String> = roots.to_vec();
    while !todo.is_empty() {
        lookup(sh, &mut known, &todo)?;
        let mut next = Vec::new();
        for name in std::mem::take(&mut todo) {
            if chosen.contains_key(&name) {
                continue;
            }
            let Some(Some(st)) = known.get(&name) else {
                bail!("package {name} is not in apt's lists (apt-get update, or a typo in the recipe)")
            };
            chosen.insert(name.clone(), st.clone());
            next.extend(st.depends.iter().flatten().cloned());
        }
        // Look up every alternative we may need, in one call, then choose.
        let wanted: Vec<String> = next.into_iter().filter(|n| !known.contains_key(n)).collect();
        lookup(sh, &mut known, &wanted)?;
        let provided: BTreeSet<String> = chosen.values().flat_map(|s| s.provides.iter().cloned()).collect();
        for st in chosen.values() {
            for group in &st.depends {
                let satisfied = group.iter().any(|a| {
                    chosen.contains_key(a)
                        || provided.contains(a)
                        || exclude.contains(a.as_str())
                        || todo.contains(a)
                });
                if satisfied {
                    continue;
                }
                match group.iter().find(|a| matches!(known.get(*a), Some(Some(_)))) {
                    Some(a) => todo.push(a.clone()),
                    None => bail!(
                        "no real package for the dependency {:?}; name a provider in the recipe's packages",
                        group.join(" | ")
                    ),
                }
            }
        }
        todo.sort();
        todo.dedup();
    }
    if let Some(p) = pins.keys().find(|p| !chosen.contains_key(*p)) {
        bail!("the recipe pins {p}, which is not among the image's packages");
    }
    Ok(chosen
        .into_iter()
        .map(|(name, st)| format!("{name}={}", pins.get(&name).unwrap_or(&st.version)))
        .collect())
}

/// Fills `known` with the stanzas of `names` (None: virtual or unknown).
fn lookup(sh: &Shell, known: &mut BTreeMap<String, Option<Stanza>>, names: &[String]) -> Result<()> {
    let names: Vec<&String> = names.iter().filter(|n| !known.contains_key(*n)).collect();
    if names.is_empty() {
        return Ok(());
    }
    let asked: Vec<String> = names.iter().map(|n| (*n).clone()).collect();
    // Purely virtual names print nothing (and a note on stderr); the others print a stanza.
    let out = cmd!(sh, "apt-cache show --no-all-versions {names...}")
        .quiet()
        .ignore_stderr()
        .ignore_status()
        .read()?;
    for n in asked {
        known.insert(n, None);
    }
    for stanza in out.split("\n\n") {
        let field = |key: &str| -> String {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let name = field("Package");
        if name.is_empty() {
            continue;
        }
        let mut depends = parse_relations(&field("Pre-Depends"));
        depends.extend(parse_relations(&field("Depends")));
        let provides = parse_relations(&field("Provides")).into_iter().flatten().collect();
        known.insert(name, Some(Stanza { depends, provides, version: field("Version") }));
    }
    Ok(())
}

/// `a (>= 1), b | c:any` becomes `[[a], [b, c]]`: names only (the archive holds one version each).
fn parse_relations(s: &str) -> Vec<Vec<String>> {
    s.split(',')
        .map(|group| {
            group
                .split('|')
                .filter_map(|alt| {
                    let name = alt.split_whitespace().next()?;
                    Some(name.split(':').next().unwrap_or(name).to_owned())
                })
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect()
}

/// Downloads, in one call, the packages of `pkgs` not yet in the cache.
pub(crate) fn prefetch(sh: &Shell, cache: &Path, pkgs: &[String]) -> Result<()> {
    let missing: Vec<&String> = pkgs.iter().filter(|p| cached(cache, p).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("downloading {} packages into {}", missing.len(), cache.display());
    let _d = sh.push_dir(cache);
    cmd!(sh, "apt-get download -q {missing...}").quiet().ignore_stdout().run().context("apt-get download")?;
    Ok(())
}

/// The cached .deb of `pkg`: `name=version` exactly (apt-get download writes an epoch's colon as
/// `%3a`), or any version of a bare `name`.
fn cached(cache: &Path, pkg: &str) -> Option<PathBuf> {
    let prefix = match pkg.split_once('=') {
        Some((name, version)) => format!("{name}_{}_", version.replace(':', "%3a")),
        None => format!("{pkg}_"),
    };
    std::fs::read_dir(cache).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            && p.extension().is_some_and(|x| x == "deb")
    })
}

/// The cached .deb of `pkg`, downloaded when missing.
pub(crate) fn fetch(sh: &Shell, cache: &Path, pkg: &str) -> Result<PathBuf> {
    let find = || cached(cache, pkg);
    if let Some(p) = find() {
        return Ok(p);
    }
    let _d = sh.push_dir(cache);
    cmd!(sh, "apt-get download -q {pkg}")
        .quiet()
        .ignore_stderr()
        .run()
        .with_context(|| format!("apt-get download {pkg}"))?;
    find().with_context(|| format!("apt-get download {pkg} left no .deb in {}", cache.display()))
}

#[cfg(test)]
mod tests {
    use super::{cached, parse_relations};

    #[test]
    fn the_cache_gives_the_version_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "libssl3_3.0.20-1~deb12u2_amd64.deb",
            "libssl3_3.0.22-1~deb12u2_amd64.deb",
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb",
        ] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let name =
            |p: &str| cached(dir.path(), p).map(|p| p.file_name().unwrap().to_string_lossy().into_owned());
        assert_eq!(name("libssl3=3.0.20-1~deb12u2").as_deref(), Some("libssl3_3.0.20-1~deb12u2_amd64.deb"));
        assert_eq!(name("libssl3=3.0.22-1~deb12u2").as_deref(), Some("libssl3_3.0.22-1~deb12u2_amd64.deb"));
        assert_eq!(name("libssl3=3.0.17-1~deb12u2"), None);
        assert!(name("busybox-static=1:1.35.0-4+deb12u1+b1").is_some());
        assert!(name("libssl3").is_some());
    }

    #[test]
    fn relations_keep_alternatives_and_drop_versions_and_arch() {
        let r = parse_relations("libc6 (>= 2.34), default-dbus-system-bus | dbus-system-bus, python3:any");
        assert_eq!(
            r,
            vec![
                vec!["libc6".to_owned()],
                vec!["default-dbus-system-bus".to_owned(), "dbus-system-bus".to_owned()],
                vec!["python3".to_owned()]
            ]
        );
        assert!(parse_relations("").is_empty());
    }
}

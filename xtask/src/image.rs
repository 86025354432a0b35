//! `cargo xtask image RECIPE`: a bootable OS image from a recipe (image-recipes/*.toml),
//! built reproducibly, then signed and published into a repository.
//!
//! 1. Debian packages are downloaded once into `target/image-cache` (`apt-get download`) and
//!    unpacked with `dpkg -x` (nothing is installed, no maintainer script runs).
//! 2. The kernel package gives `/boot/vmlinuz` and the modules the recipe lists, with their
//!    dependencies (from `modules.dep`); busybox's applets become symlinks; our binaries come
//!    from `target/release` (or, with `--profile dev`, from `target/debug`: the e2e run uses
//!    the binaries the tests already built instead of compiling everything a second time),
//!    stripped; the recipe's files are written; the trusted keys are copied in.
//! 3. The initramfs (`/boot/initrd.img`) is built by dracut with our module `dracut/90acl`,
//!    `--reproducible`, from a private copy of dracut's modules (nothing on the host changes).
//! 4. The tree becomes an erofs image with every timestamp at the recipe's `epoch`, owner root,
//!    and a UUID derived from the recipe and version; `aclpub build` adds the dm-verity tree and
//!    cuts the payload, `aclpub sign` and `aclpub publish` put it into the repository.
//!
//! Same recipe, same package files, same toolchain: same image bytes (the e2e run builds one
//! version twice and compares).

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use xshell::{Shell, cmd};

/// Tools the image build calls.
pub(crate) const IMAGE_TOOLS: [crate::tools::Tool; 9] = [
    ("strip", "binutils"),
    ("systemd-sysusers", "systemd"),
    ("systemctl", "systemd"),
    ("tar", "tar"),
    ("mkfs.erofs", "erofs-utils"),
    ("dracut", "dracut-core"),
    ("veritysetup", "cryptsetup-bin"),
    ("kexec", "kexec-tools"),
    ("depmod", "kmod"),
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Recipe {
    include: Option<String>,
    name: Option<String>,
    arch: Option<String>,
    kernel: Option<String>,
    #[serde(default)]
    packages: Vec<String>,
    /// Dependencies not to follow (needed only by maintainer scripts, which never run here).
    #[serde(default)]
    exclude_packages: Vec<String>,
    /// Versions to take instead of apt's candidate, by package name (one of the versions
    /// apt's lists hold: `apt-cache madison NAME`).
    #[serde(default)]
    pin: BTreeMap<String, String>,
    /// Paths removed from the unpacked packages (documentation, tools the image does not run).
    #[serde(default)]
    drop: Vec<String>,
    /// systemd units to enable (`systemctl --root enable`, as a package's postinst would).
    #[serde(default)]
    enable: Vec<String>,
    /// systemd units to mask.
    #[serde(default)]
    mask: Vec<String>,
    #[serde(default)]
    modules: Vec<String>,
    #[serde(default)]
    binaries: Vec<String>,
    cmdline: Option<String>,
    epoch: Option<i64>,
    #[serde(default)]
    file: Vec<FileSpec>,
    /// OCI images made at build time, for containerd to import at boot (no registry).
    #[serde(default)]
    container: Vec<crate::oci::ContainerSpec>,
}

/// A file of the image: its text, a file of this repository copied byte for byte, or a
/// symbolic link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    path: String,
    text: Option<String>,
    /// A path relative to the repository's root (e.g. systemd/acl-agentd.service).
    source: Option<String>,
    link: Option<String>,
    mode: Option<u32>,
}

/// A recipe with its includes applied: the included recipe first, this one's scalars win, its
/// lists add, its files replace same-path files.
fn load(path: &Path) -> Result<Recipe> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read recipe {}", path.display()))?;
    let mut r: Recipe = toml::from_str(&text).with_context(|| format!("recipe {}", path.display()))?;
    let Some(inc) = r.include.take() else { return Ok(r) };
    let mut base = load(&path.parent().unwrap_or(Path::new(".")).join(&inc))?;
    base.name = r.name.or(base.name);
    base.arch = r.arch.or(base.arch);
    base.kernel = r.kernel.or(base.kernel);
    base.cmdline = r.cmdline.or(base.cmdline);
    base.epoch = r.epoch.or(base.epoch);
    base.packages.extend(r.packages);
    base.exclude_packages.extend(r.exclude_packages);
    base.pin.extend(r.pin);
    base.drop.extend(r.drop);
    base.enable.extend(r.enable);
    base.mask.extend(r.mask);
    base.container.extend(r.container);
    base.modules.extend(r.modules);
    base.binaries.extend(r.binaries);
    for f in r.file {
        base.file.retain(|b| b.path != f.path);
        base.file.push(f);
    }
    Ok(base)
}

/// Which cargo profile's binaries go into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Profile {
    /// `cargo build --release`: what a user ships.
    Release,
    /// The dev profile (dependencies at opt-level 3, our crates unoptimised, overflow checks
    /// on): what `cargo nextest run --workspace` has already built, so tests reuse it.
    Dev,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "target/release",
            Profile::Dev => "target/debug",
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "dev",
        }
    }

    /// Where this profile puts binary `name`, under the workspace root.
    pub(crate) fn bin(self, root: &Path, name: &str) -> PathBuf {
        root.join(self.dir()).join(name)
    }
}

/// What to build and where to put it.
#[derive(Debug)]
pub(crate) struct ImageArgs {
    /// Whose binaries: release or dev.
    pub(crate) profile: Profile,
    pub(crate) recipe: PathBuf,
    pub(crate) version: String,
    /// Work directory (tree, filesystem, build output).
    pub(crate) work: PathBuf,
    /// Repository to publish into (created if missing); none: build only.
    pub(crate) repo: Option<PathBuf>,
    /// Signing keys (aclpub secret keys).
    pub(crate) keys: Vec<PathBuf>,
    /// Directory of trusted *.pub keys (built into the image and its initramfs).
    pub(crate) trust: PathBuf,
}

/// What was built.
#[derive(Debug)]
pub(crate) struct Built {
    /// `aclpub build` output (manifest.json, payload).
    pub(crate) build: PathBuf,
    /// The kernel and initramfs (also inside the image), for a first stage.
    pub(crate) vmlinuz: PathBuf,
    pub(crate) initrd: PathBuf,
    /// The kernel release, e.g. 6.1.0-56-amd64.
    pub(crate) kernel_release: String,
}

/// `cargo xtask image RECIPE --version V --repo DIR --key K... --trust DIR [--work DIR]
/// [--profile release|dev]`.
pub(crate) fn cli(sh: &Shell, args: &[&str]) -> Result<()> {
    let mut it = args.iter();
    let recipe = PathBuf::from(it.next().context("usage: cargo xtask image RECIPE --version V ...")?);
    let (mut version, mut repo, mut keys, mut trust, mut work) = (None, None, Vec::new(), None, None);
    let mut profile = Profile::Release;
    while let Some(a) = it.next() {
        let mut val = || it.next().map(|s| s.to_string()).with_context(|| format!("{a} needs a value"));
        match *a {
            "--version" => version = Some(val()?),
            "--repo" => repo = Some(PathBuf::from(val()?)),
            "--key" => keys.push(PathBuf::from(val()?)),
            "--trust" => trust = Some(PathBuf::from(val()?)),
            "--work" => work = Some(PathBuf::from(val()?)),
            "--profile" => {
                profile = match val()?.as_str() {
                    "release" => Profile::Release,
                    "dev" => Profile::Dev,
                    other => bail!("--profile {other}: expected release or dev"),
                }
            }
            other => bail!("unknown option {other}"),
        }
    }
    let version = version.context("--version is required")?;
    let root = sh.current_dir();
    let args = ImageArgs {
        profile,
        work: work.unwrap_or_else(|| root.join("target/images").join(format!("{}-{version}", stem(&recipe)))),
        recipe,
        version,
        repo,
        keys,
        trust: trust.context("--trust DIR (the public keys the image will trust) is required")?,
    };
    build_binaries(sh, profile)?;
    let built = build(sh, &args)?;
    println!("built {} ({})", built.build.display(), built.kernel_release);
    Ok(())
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Builds what images and the first stage contain, with `profile`.
pub(crate) fn build_binaries(sh: &Shell, profile: Profile) -> Result<()> {
    let p = profile.name();
    cmd!(sh, "cargo build --quiet --profile {p} --locked -p agent -p aclctl -p boot -p publish").run()?;
    Ok(())
}

/// Builds (and publishes) the image; see the module docs.
pub(crate) fn build(sh: &Shell, a: &ImageArgs) -> Result<Built> {
    crate::tools::ensure(sh, &IMAGE_TOOLS)?;
    let root = sh.current_dir();
    let work = root.join(&a.work);
    let a = &ImageArgs {
        profile: a.profile,
        work,
        recipe: a.recipe.clone(),
        version: a.version.clone(),
        repo: a.repo.clone(),
        keys: a.keys.clone(),
        trust: root.join(&a.trust),
    };
    let r = load(&a.recipe)?;
    let name = r.name.clone().context("the recipe has no name")?;
    let kernel_pkg = r.kernel.clone().context("the recipe names no kernel package")?;
    let epoch = r.epoch.unwrap_or(0);
    let cache = root.join("target/image-cache");
    std::fs::create_dir_all(&cache)?;
    let _ = std::fs::remove_dir_all(&a.work);
    let tree = a.work.join("tree");
    let kstage = a.work.join("kernel");
    for d in [
        "proc", "sys", "dev", "run", "tmp", "var", "root", "mnt", "boot", "etc/acl", "usr/bin", "usr/sbin",
        "home", "srv", "opt",
    ] {
        std::fs::create_dir_all(tree.join(d))?;
    }

    // 1. Packages: the closure of the recipe's, unpacked.
    let pkgs = crate::debs::closure(sh, &r.packages, &r.exclude_packages, &r.pin)?;
    crate::debs::prefetch(sh, &cache, &pkgs)?;
    for p in &pkgs {
        let deb = crate::debs::fetch(sh, &cache, p)?;
        cmd!(sh, "dpkg -x {deb} {tree}").quiet().run()?;
    }
    println!("{} packages unpacked (list in {})", pkgs.len(), a.work.join("packages.txt").display());
    std::fs::write(a.work.join("packages.txt"), pkgs.join("\n") + "\n")?;
    for d in &r.drop {
        let p = tree.join(d.trim_start_matches('/'));
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)?;
        } else if p.symlink_metadata().is_ok() {
            std::fs::remove_file(&p)?;
        }
    }
    // 2. Kernel and modules.
    let kdeb = crate::debs::fetch(sh, &cache, &kernel_pkg)?;
    cmd!(sh, "dpkg -x {kdeb} {kstage}").run()?;
    let kver = std::fs::read_dir(kstage.join("lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules/<release>")?;
    cmd!(sh, "depmod -b {kstage} {kver}").run()?;
    std::fs::copy(kstage.join(format!("boot/vmlinuz-{kver}")), tree.join("boot/vmlinuz"))?;
    copy_modules(&kstage.join("lib/modules").join(&kver), &tree.join("lib/modules").join(&kver), &r.modules)?;
    cmd!(sh, "depmod -b {tree} {kver}").run()?;
    // busybox applets as symlinks, where nothing else is.
    let busybox = tree.join("bin/busybox");
    if busybox.exists() {
        let list = cmd!(sh, "{busybox} --list-full").read()?;
        for applet in list.lines() {
            let link = tree.join(applet);
            if link.symlink_metadata().is_err() {
                std::fs::create_dir_all(link.parent().expect("has a parent"))?;
                std::os::unix::fs::symlink("/bin/busybox", &link)?;
            }
        }
    }
    // Our binaries, keys, version, recipe files.
    for b in &r.binaries {
        // Stripped: both profiles keep line tables for backtraces on developer machines.
        let (src, dst) = (a.profile.bin(&root, b), tree.join("usr/bin").join(b));
        cmd!(sh, "strip --strip-all -o {dst} {src}")
            .run()
            .with_context(|| format!("strip {b} (built by build_binaries)"))?;
    }
    let keys_dir = tree.join("etc/acl-update/keys");
    std::fs::create_dir_all(&keys_dir)?;
    for k in
        std::fs::read_dir(&a.trust)?.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "pub"))
    {
        std::fs::copy(k.path(), keys_dir.join(k.file_name()))?;
    }
    std::fs::write(tree.join("etc/acl/version"), format!("{}\n", a.version))?;
    for f in &r.file {
        write_file(&root, &tree, f)?;
    }
    for c in &r.container {
        crate::oci::build(sh, &tree, c, epoch)?;
    }
    system_users(sh, &tree, epoch)?;
    // Units enabled and masked as a package's maintainer scripts or an administrator would.
    let systemctl_root = format!("--root={}", tree.display());
    for u in &r.enable {
        cmd!(sh, "systemctl {systemctl_root} --quiet enable {u}").quiet().run()?;
    }
    for u in &r.mask {
        cmd!(sh, "systemctl {systemctl_root} --quiet mask {u}").quiet().run()?;
    }

    // 3. The initramfs, from a private copy of dracut with our module.
    let dracut_base = a.work.join("dracut");
    let boot_bin = a.work.join("acl-boot");
    let src = a.profile.bin(&root, "acl-boot");
    cmd!(sh, "strip --strip-all -o {boot_bin} {src}").run().context("strip acl-boot for the initramfs")?;
    cmd!(sh, "cp -a /usr/lib/dracut {dracut_base}").run()?;
    cmd!(sh, "cp -a {root}/dracut/90acl {dracut_base}/modules.d/90acl").run()?;
    let initrd = tree.join("boot/initrd.img");
    // Relative paths: dracut records its arguments in the initramfs, and the work directory's
    // location must not change the bytes.
    let kmoddir = format!("kernel/lib/modules/{kver}");
    {
        let _cwd = sh.push_dir(&a.work);
        let _e1 = sh.push_env("dracutbasedir", &dracut_base);
        let _e2 = sh.push_env("ACL_BOOT_BIN", &boot_bin);
        let _e3 = sh.push_env("ACL_IMAGE_ROOT", &tree);
        let _e4 = sh.push_env("SOURCE_DATE_EPOCH", epoch.to_string());
        let confdir = "dracut.conf.d";
        std::fs::create_dir_all(a.work.join(confdir))?;
        cmd!(
            sh,
            "dracut --quiet --no-hostonly --reproducible --no-early-microcode --conf /dev/null --confdir {confdir}
             --kver {kver} --kmoddir {kmoddir} -m 'base acl' --zstd --force tree/boot/initrd.img"
        )
        .run()?;
    }

    // 4. The filesystem, the signed image, the repository.
    let fs = a.work.join("fs.erofs");
    let uuid = uuid_of(&format!("{name}-{}", a.version));
    let t = format!("-T{epoch}");
    let u = format!("-U{uuid}");
    cmd!(sh, "mkfs.erofs --quiet {t} --ignore-mtime --all-root {u} {fs} {tree}").run()?;
    // Inode numbers that do not shift when a file is added (see crates/erofs-stable).
    let image = std::fs::OpenOptions::new().read(true).write(true).open(&fs)?;
    erofs_stable::stabilize(&image).with_context(|| format!("{}: stable inode numbers", fs.display()))?;
    drop(image);
    let aclpub = a.profile.bin(&root, "aclpub");
    let out = a.work.join("build");
    let version = &a.version;
    let cmdline = r.cmdline.clone().unwrap_or_default();
    // Format 2: these images boot through a first stage built from the same tree.
    cmd!(sh, "{aclpub} build {fs} --out {out} --version {version} --cmdline {cmdline} --manifest-format 2")
        .quiet()
        .ignore_stdout()
        .run()?;
    let mut sign_keys: Vec<String> = Vec::new();
    for k in &a.keys {
        sign_keys.push("--key".to_owned());
        sign_keys.push(k.display().to_string());
    }
    let sign_args = sign_keys.clone();
    cmd!(sh, "{aclpub} sign {sign_args...} {out}/manifest.json").quiet().ignore_stdout().run()?;
    if let Some(repo) = &a.repo {
        let trust = &a.trust;
        cmd!(sh, "{aclpub} publish {out} --repo {repo} --channel stable {sign_keys...} --trust {trust}")
            .quiet()
            .ignore_stdout()
            .run()?;
    }
    // The kernel and initramfs beside the build, for a first stage.
    let vmlinuz = a.work.join("vmlinuz");
    std::fs::copy(tree.join("boot/vmlinuz"), &vmlinuz)?;
    let first_initrd = a.work.join("initrd.img");
    std::fs::copy(&initrd, &first_initrd)?;
    Ok(Built { build: out, vmlinuz, initrd: first_initrd, kernel_release: kver })
}

/// The system users and groups the packages declare (sysusers.d), written into the read-only
/// `/etc` at build time since nothing can add them at boot; the password ages' day count is
/// the recipe's epoch, not the build day.
fn system_users(sh: &Shell, tree: &Path, epoch: i64) -> Result<()> {
    if !["usr/lib/sysusers.d", "lib/sysusers.d"].iter().any(|d| tree.join(d).is_dir()) {
        return Ok(());
    }
    let root = format!("--root={}", tree.display());
    // It tells of every user it creates; a failure still shows in its exit status.
    cmd!(sh, "systemd-sysusers {root}").quiet().ignore_stderr().run()?;
    let day = (epoch / 86_400).to_string();
    for f in ["etc/shadow", "etc/gshadow"] {
        let p = tree.join(f);
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        let fixed: String = text
            .lines()
            .map(|l| {
                let mut fields: Vec<&str> = l.split(':').collect();
                if f == "etc/shadow" && fields.len() > 2 && !fields[2].is_empty() {
                    fields[2] = &day;
                }
                fields.join(":") + "\n"
            })
            .collect();
        std::fs::write(&p, fixed)?;
    }
    for f in ["etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-"] {
        let _ = std::fs::remove_file(tree.join(f));
    }
    Ok(())
}

/// Writes one of the recipe's files into the tree, replacing whatever is at its path.
fn write_file(root: &Path, tree: &Path, f: &FileSpec) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let p = tree.join(f.path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    // Replace, never write through: the path may be a symlink (a busybox applet).
    let _ = std::fs::remove_file(&p);
    let mode = match (&f.text, &f.source, &f.link) {
        (Some(text), None, None) => {
            std::fs::write(&p, text.strip_prefix('\n').unwrap_or(text))?;
            f.mode.unwrap_or(0o644)
        }
        (None, Some(src), None) => {
            // Byte for byte, so that what the image runs is what the repository holds.
            std::fs::copy(root.join(src), &p).with_context(|| format!("copy {src} into the image"))?;
            f.mode.unwrap_or(0o644)
        }
        (None, None, Some(target)) => {
            std::os::unix::fs::symlink(target, &p)?;
            return Ok(());
        }
        _ => bail!("file {}: give exactly one of text, source and link", f.path),
    };
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies the named modules and everything they depend on (by `modules.dep`).
fn copy_modules(from: &Path, to: &Path, names: &[String]) -> Result<()> {
    let dep = std::fs::read_to_string(from.join("modules.dep")).context("modules.dep (run depmod first)")?;
    let norm = |s: &str| s.replace('-', "_");
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep.lines() {
        let Some((m, rest)) = line.split_once(':') else { continue };
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or("");
        deps.insert(norm(name), (m.to_owned(), rest.split_whitespace().map(str::to_owned).collect()));
    }
    let by_path: BTreeMap<&str, &str> = deps.iter().map(|(n, (p, _))| (p.as_str(), n.as_str())).collect();
    let mut want: Vec<String> = names.iter().map(|n| norm(n)).collect();
    let mut done = BTreeSet::new();
    while let Some(n) = want.pop() {
        if !done.insert(n.clone()) {
            continue;
        }
        let Some((path, needs)) = deps.get(&n) else {
            // Built into the kernel (modules.builtin) needs no file.
            let builtin = std::fs::read_to_string(from.join("modules.builtin")).unwrap_or_default();
            if builtin.lines().any(|l| norm(l).ends_with(&format!("/{n}.ko"))) {
                continue;
            }
            bail!("module {n} is not in this kernel");
        };
        let dst = to.join(path);
        std::fs::create_dir_all(dst.parent().expect("has a parent"))?;
        std::fs::copy(from.join(path), &dst)?;
        for d in needs {
            want.push(by_path.get(d.as_str()).map(|s| s.to_string()).unwrap_or_default());
        }
    }
    for f in ["modules.order", "modules.builtin", "modules.builtin.modinfo"] {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f))?;
        }
    }
    Ok(())
}

/// A stable UUID from a name (the first 16 bytes of its SHA-256, as a version-4-shaped UUID).
fn uuid_of(name: &str) -> String {
    let d = manifest::Sha256Digest::of(name.as_bytes()).to_string();
    format!("{}-{}-4{}-8{}-{}", &d[0..8], &d[8..12], &d[13..16], &d[17..20], &d[20..32])
}

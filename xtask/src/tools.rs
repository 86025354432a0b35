//! Outside tools the tasks need, and the Debian packages that provide them.

use anyhow::{Result, bail};

/// A command and the Debian package that ships it.
pub(crate) type Tool = (&'static str, &'static str);

/// Tools the test suite calls.
pub(crate) const TEST_TOOLS: [Tool; 9] = [
    ("cgpt", "cgpt"),
    ("nginx", "nginx"),
    ("flock", "util-linux"),
    ("systemd-analyze", "systemd"),
    ("veritysetup", "cryptsetup-bin"),
    ("mkfs.erofs", "erofs-utils"),
    ("sgdisk", "gdisk"),
    ("losetup", "mount"),
    // The first stage's crash test makes FAT file systems and checks them.
    ("fsck.vfat", "dosfstools"),
];
/// Tools the demo calls.
pub(crate) const DEMO_TOOLS: [Tool; 3] =
    [("mkfs.erofs", "erofs-utils"), ("sgdisk", "gdisk"), ("nginx", "nginx")];
/// Tools the benchmarks call.
pub(crate) const BENCH_TOOLS: [Tool; 6] = [
    ("zstd", "zstd"),
    ("sgdisk", "gdisk"),
    ("nginx", "nginx"),
    ("curl", "curl"),
    ("time", "time"),
    ("losetup", "mount"),
];

fn have(sh: &xshell::Shell, cmd: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().any(|d| std::path::Path::new(d).join(cmd).exists())
        || xshell::cmd!(sh, "which {cmd}").quiet().ignore_stdout().ignore_stderr().run().is_ok()
}

/// Installs the packages of missing tools with apt-get (as root), or says what to install.
pub(crate) fn ensure(sh: &xshell::Shell, tools: &[Tool]) -> Result<()> {
    let missing: Vec<&str> = tools.iter().filter(|(cmd, _)| !have(sh, cmd)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = xshell::cmd!(sh, "id -u").quiet().read()? == "0";
    if !is_root {
        bail!("missing tools; install them with: sudo apt-get install {}", missing.join(" "));
    }
    println!("installing {}", missing.join(" "));
    let _env = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    xshell::cmd!(sh, "apt-get update -qq").run()?;
    xshell::cmd!(sh, "apt-get install -y -qq --no-install-recommends {missing...}").run()?;
    Ok(())
}

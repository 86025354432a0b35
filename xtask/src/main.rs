//! `cargo xtask`: the project's tasks, in Rust so they run wherever cargo does.
//!
//! | task | what it does |
//! |---|---|
//! | `test` | installs the Debian tools the tests use if missing, then fmt, clippy, docs, all tests, then `e2e` |
//! | `demo` | the main job: build two signed images, publish them, verify the repository |
//! | `bench build [--size-mib N]` | build an image of real files; MB/s against `zstd` in the same run |
//! | `bench chunk-size` | compression ratio and adaptive-update cost for several chunk sizes |
//! | `bench install [--size-mib N]` | install from nginx to a loop device against curl, zstd and dd |
//! | `bench delta` | bytes an update fetches between real images for typical changes, against the whole payload and `zstd --patch-from` |
//! | `image RECIPE --version V --trust DIR [--key K]... [--repo DIR]` | build a bootable OS image from a recipe, sign and publish it |
//! | `coordinator-image [--profile release\|dev] [--out DIR]` | the coordinator's OCI image layout (`target/oci/acl-coordinator`) |
//! | `e2e` | build the test OS images, boot them in qemu and run the scenarios a-j of `integration/e2e` |
//! | `bench idle [--seconds N] [--kubernetes]` | the idle agent's memory and wake-ups against a `sleep` baseline (with `--kubernetes`: in Kubernetes mode, against the test API server) |

// A task runner reports to its user on standard output.
#![allow(clippy::print_stdout)]

mod bench;
mod coordinator_image;
mod debs;
mod delta;
mod demo;
mod e2e;
mod image;
mod nginx;
mod oci;
mod tools;

use anyhow::{Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if CARGO_RUN_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
        // Started by `cargo run`: run again without its variables (see CARGO_RUN_VARS).
        let mut again = std::process::Command::new(std::env::current_exe()?);
        again.args(std::env::args_os().skip(1));
        for v in CARGO_RUN_VARS {
            again.env_remove(v);
        }
        std::process::exit(again.status()?.code().unwrap_or(1));
    }
    let sh = xshell::Shell::new()?;
    sh.change_dir(project_root());
    match args.as_slice() {
        ["test"] => test(&sh),
        ["demo"] => demo::run(&sh),
        ["image", rest @ ..] => image::cli(&sh, rest),
        ["coordinator-image", rest @ ..] => coordinator_image::cli(&sh, rest),
        ["e2e"] => e2e::run(&sh),
        ["bench", "build", rest @ ..] => bench::build(&sh, size_arg(rest)?.unwrap_or(1024)),
        ["bench", "chunk-size", rest @ ..] => bench::chunk_size(&sh, size_arg(rest)?.unwrap_or(256)),
        ["bench", "install", rest @ ..] => bench::install(&sh, size_arg(rest)?.unwrap_or(1024)),
        ["bench", "delta"] => delta::run(&sh),
        ["bench", "idle"] => bench::idle(&sh, 60, false),
        ["bench", "idle", "--kubernetes"] => bench::idle(&sh, 60, true),
        ["bench", "idle", "--seconds", n] => bench::idle(&sh, n.parse()?, false),
        ["bench", "idle", "--seconds", n, "--kubernetes"] => bench::idle(&sh, n.parse()?, true),
        _ => {
            println!(
                "usage: cargo xtask <test | demo | image RECIPE ... | coordinator-image [--profile release|dev] [--out DIR] | e2e | bench build [--size-mib N] | bench chunk-size [--size-mib N] | bench install [--size-mib N] | bench delta | bench idle [--seconds N] [--kubernetes]>"
            );
            if args.is_empty() || args == ["--help"] { Ok(()) } else { bail!("unknown task {args:?}") }
        }
    }
}

fn size_arg(rest: &[&str]) -> Result<Option<u64>> {
    match rest {
        [] => Ok(None),
        ["--size-mib", n] => Ok(Some(n.parse()?)),
        _ => bail!("unexpected arguments {rest:?}"),
    }
}

/// What `cargo run` sets for xtask itself. A cargo started from here must not inherit them:
/// build scripts watch some (ring's reruns when `CARGO_MANIFEST_DIR` changes), and every build
/// from inside xtask would then recompile what a build from outside made, and the reverse.
pub(crate) const CARGO_RUN_VARS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PKG_NAME",
    "CARGO_PKG_VERSION",
    "CARGO_PKG_VERSION_MAJOR",
    "CARGO_PKG_VERSION_MINOR",
    "CARGO_PKG_VERSION_PATCH",
    "CARGO_PKG_VERSION_PRE",
    "CARGO_PKG_AUTHORS",
    "CARGO_PKG_DESCRIPTION",
    "CARGO_PKG_HOMEPAGE",
    "CARGO_PKG_REPOSITORY",
    "CARGO_PKG_LICENSE",
    "CARGO_PKG_LICENSE_FILE",
    "CARGO_PKG_RUST_VERSION",
    "CARGO_PKG_README",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

fn project_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_owned()
}

/// Every check CI runs, in the order that fails fastest.
fn test(sh: &xshell::Shell) -> Result<()> {
    tools::ensure(sh, &tools::TEST_TOOLS)?;
    xshell::cmd!(sh, "cargo fmt --all -- --check").run()?;
    xshell::cmd!(sh, "cargo clippy --workspace --all-targets --locked -- -D warnings").run()?;
    // aclctl talks to the agent through crate localapi and links nothing of Kubernetes.
    let tree = xshell::cmd!(sh, "cargo tree --locked -p aclctl -e normal --prefix none").read()?;
    if let Some(l) = tree.lines().find(|l| l.starts_with("kube") || l.starts_with("k8s-openapi")) {
        bail!("aclctl depends on {l}: it must reach the agent only through crate localapi");
    }
    {
        let _env = sh.push_env("RUSTDOCFLAGS", "-D warnings");
        xshell::cmd!(sh, "cargo doc --workspace --no-deps --locked").quiet().run()?;
    }
    xshell::cmd!(sh, "cargo test --workspace --locked --doc --quiet").run()?;
    // Tests that need an outside tool fail, rather than skip, when it is missing.
    let _env = sh.push_env("ACL_REQUIRE_TOOLS", "1");
    // Loop devices work on the machines CI runs on; a test that cannot attach one fails there.
    let _loop = sh.push_env("ACL_REQUIRE_LOOP", "1");
    if xshell::cmd!(sh, "cargo nextest --version").quiet().ignore_stdout().ignore_stderr().run().is_ok() {
        xshell::cmd!(sh, "cargo nextest run --workspace --locked --no-fail-fast").run()?;
    } else {
        xshell::cmd!(sh, "cargo test --workspace --locked --no-fail-fast").run()?;
    }
    coordinator_image::check_reproducible(sh)?;
    // Last, the slowest: real kernels in qemu (ACL_SKIP_E2E=1 leaves them out on a laptop).
    if std::env::var_os("ACL_SKIP_E2E").is_some() {
        println!("ACL_SKIP_E2E is set: the qemu end-to-end scenarios did not run");
        return Ok(());
    }
    e2e::run(sh)
}

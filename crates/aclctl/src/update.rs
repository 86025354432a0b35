//! `aclctl update`: find the newest allowed release in a repository and install it into the
//! slot that is not booted, with a progress bar, then make it boot next.

use anyhow::{Context as _, Result};
use fetch::{FetchOptions, Fetcher};
use install::{Counters, InstallRequest};
use repo::TrustPolicy;
use repo::state::AcceptedState;
use signing::TrustedKeys;
use slot::Tries;
use slot::choice::Slot;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Where to update from and how.
#[derive(Debug)]
pub(crate) struct UpdateArgs {
    pub(crate) repo: String,
    pub(crate) channel: String,
    pub(crate) trust: Vec<PathBuf>,
    pub(crate) threshold: usize,
    pub(crate) version: Option<semver::Version>,
    pub(crate) tries: u8,
    pub(crate) parallel: usize,
    pub(crate) ca_file: Option<PathBuf>,
    /// Provisioning a fresh disk: write the slot that is not `booted` though nothing runs.
    pub(crate) provision: bool,
}

/// Updates `disk` (booted from `booted`) and prints what happened.
pub(crate) fn run(disk: &Path, booted: Slot, state_dir: &Path, a: &UpdateArgs, json: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(update(disk, booted, state_dir, a, json))
}

async fn update(disk: &Path, booted: Slot, state_dir: &Path, a: &UpdateArgs, json: bool) -> Result<()> {
    let tries = Tries::new(a.tries).with_context(|| format!("--tries {} must be 1 to 15", a.tries))?;
    let policy = TrustPolicy::new(TrustedKeys::load(&a.trust)?, a.threshold).map_err(anyhow::Error::msg)?;
    let fetcher =
        Fetcher::new(&a.repo, FetchOptions { ca_file: a.ca_file.clone(), ..FetchOptions::default() })?;
    std::fs::create_dir_all(state_dir).with_context(|| format!("create {}", state_dir.display()))?;

    // The channel index: signed, fresh, not older than the last one accepted.
    let state_path = state_dir.join("accepted-index.json");
    let state = AcceptedState::load(&state_path)?;
    let index_path = repo::layout::index_path(&a.channel);
    let (index, accepted) = fetcher
        .get_signed(&index_path, |b, sig| {
            policy.index(&a.channel, b, sig, jiff::Timestamp::now(), state.get(&a.channel))
        })
        .await??;
    // Under the record's lock, against what it holds now (the agent may have checked meanwhile).
    AcceptedState::commit(&state_path, accepted)?;

    // The release: the one asked for, or the newest; never a downgrade unless asked by version.
    // The floor is what the booted slot's signed trailer says it runs.
    let arch = std::env::consts::ARCH;
    let current = if a.provision {
        None
    } else {
        let what = format!("slot {booted} trailer");
        let verify = |m: &[u8], s: &[u8]| policy.manifest(&what, m, s).map_err(|e| e.to_string());
        install::running_manifest(disk, state_dir, booted, verify).ok().map(|(m, _)| m.version)
    };
    let release = match &a.version {
        Some(v) => index
            .releases
            .iter()
            .find(|r| &r.version == v && r.arch == arch)
            .with_context(|| format!("channel {:?} has no release {v} for {arch}", a.channel))?,
        None => index
            .latest(arch)
            .with_context(|| format!("channel {:?} has no release for {arch}", a.channel))?,
    };
    if let Some(current) = current.as_ref().filter(|c| a.version.is_none() && **c >= release.version) {
        if json {
            let out =
                serde_json::json!({ "up_to_date": true, "version": current.to_string(), "slot": booted });
            println!("{out:#}");
        } else {
            println!("up to date: slot {booted} runs {current}, the newest in {:?}", a.channel);
        }
        return Ok(());
    }
    let manifest_bytes = fetcher.get(&release.manifest).await?;
    let manifest_sig = fetcher.get(&format!("{}.sig", release.manifest)).await?;
    let m = policy.release_manifest(release, &manifest_bytes, &manifest_sig)?;
    let payload_path = repo::layout::payload_path(&release.manifest, &m.payload.path);

    let req = InstallRequest {
        disk,
        booted,
        manifest: &m,
        manifest_bytes: &manifest_bytes,
        manifest_sig: &manifest_sig,
        payload_path,
        state_dir,
        tries,
        parallel: a.parallel,
        max_request: 4 << 20,
        provision: a.provision,
    };
    let counters = Arc::new(Counters::default());
    let bar = cliutil::byte_bar(&format!("{}", m.version), m.image_size);
    let ticker = {
        let (bar, counters, fetcher) = (bar.clone(), Arc::clone(&counters), fetcher.clone());
        tokio::spawn(async move {
            loop {
                let done = counters.done.load(Ordering::Relaxed);
                let checked = counters.read_back.load(Ordering::Relaxed);
                bar.set_position(if checked > 0 { checked } else { done });
                bar.set_prefix(if checked > 0 { "verifying" } else { "installing" });
                bar.set_message(format!(
                    "fetched {} reused {}",
                    mib(fetcher.bytes_fetched()),
                    mib(counters.reused.load(Ordering::Relaxed))
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let result = install::install(&req, &fetcher, &counters).await;
    ticker.abort();
    bar.finish_and_clear();
    let target = booted.other();
    let r = result.map_err(|e| {
        let state = after_failure(disk, booted, counters.done.load(Ordering::Relaxed), m.image_size);
        anyhow::Error::new(e).context(format!("installing {} into slot {target} failed; {state}", m.version))
    })?;
    if r.already_next {
        if json {
            let out = serde_json::json!({
                "up_to_date": false,
                "already_installed": true,
                "version": m.version.to_string(),
                "slot": target,
                "fetched_bytes": fetcher.bytes_fetched(),
            });
            println!("{out:#}");
        } else {
            println!(
                "slot {target} already holds {} (installed and verified before) and boots next: nothing to do; reboot to use it",
                m.version
            );
        }
        return Ok(());
    }
    if json {
        let out = serde_json::json!({
            "up_to_date": false,
            "version": m.version.to_string(),
            "slot": target,
            "image_bytes": r.image_bytes,
            "payload_bytes": m.payload.size,
            "fetched_bytes": fetcher.bytes_fetched(),
            "reused_bytes": r.reused_bytes,
            "resumed_bytes": r.resumed_bytes,
            "computed_bytes": r.computed_bytes,
            "direct_io": r.direct_io,
            "one_pass": r.one_pass,
            "write_seconds": r.write_time.as_secs_f64(),
            "verify_seconds": r.verify_time.as_secs_f64(),
            "writer_busy_seconds": r.writer_busy.as_secs_f64(),
        });
        println!("{out:#}");
        return Ok(());
    }
    println!(
        "installed {} into slot {target}: fetched {} ({:.1}% of the {} payload), reused {} from slot {booted}, resumed {}, computed {} (the dm-verity tree)",
        m.version,
        mib(fetcher.bytes_fetched()),
        100.0 * fetcher.bytes_fetched() as f64 / m.payload.size as f64,
        mib(m.payload.size),
        mib(r.reused_bytes),
        mib(r.resumed_bytes),
        mib(r.computed_bytes),
    );
    println!(
        "  write {:.2} s, read-back verify {:.2} s ({}); slot {target} boots next: reboot to use it",
        r.write_time.as_secs_f64(),
        r.verify_time.as_secs_f64(),
        if r.direct_io { "O_DIRECT" } else { "buffered, cache dropped" }
    );
    if r.one_pass {
        println!(
            "  the repository's server ignores Range requests: the payload was read in one pass (configure it to answer ranges to fetch only what changed)"
        );
    }
    if current.is_none() && r.reused_bytes == 0 && !a.provision {
        println!("  (no record of what slot {booted} holds, so nothing could be reused)");
    }
    Ok(())
}

/// What the disk holds after a failed install, in words: whether the target was touched, and
/// whether a rerun resumes.
fn after_failure(disk: &Path, booted: Slot, done: u64, image: u64) -> String {
    let target = booted.other();
    match slot::Disk::open(disk, false) {
        Ok(d) if d.slots().get(target).priority() == 0 => format!(
            "slot {target} is unbootable and holds {} of the {} image ({}); slot {booted} is untouched and boots \
             next; run the same command again to resume",
            mib(done),
            mib(image),
            if done > 0 { "written and verified so far" } else { "nothing usable yet" },
        ),
        Ok(d) => format!(
            "nothing was written: slot {target} is as it was ({}), and slot {booted} is untouched",
            d.slots().get(target)
        ),
        Err(e) => format!("the disk's state could not be read back: {e}"),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}
